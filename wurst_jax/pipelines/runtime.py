"""What running a pipeline needs around the models: compiled functions cached per shape, progress lines, device
memory figures, and the persistent compilation cache (on by default: `use_compilation_cache`).

`CompileCache` belongs to a pipeline (the stages of one pipeline share it): it jits a function once, lowers and
compiles it explicitly per (static arguments, input shapes and shardings) so compile time and run time are
reported apart, and reuses the executable on later calls. With the persistent cache on, a later process loads the
executable an earlier one kept (`wurst_jax.warm`) without tracing the function again.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from wurst_jax import warm

_PEAK = [0]  # the process-wide high-water mark of `device_memory_in_use` (CPU: no allocator statistics)


def say(msg: str) -> None:
    print(f"[wurst_jax] {msg}", file=sys.stderr, flush=True)


class CompileCache:
    """Executables of the pipeline's stage functions, compiled once per shape; optional progress lines."""

    def __init__(self, progress: bool = False):
        self.progress = progress
        self._jitted: dict[Any, Any] = {}
        self._executables: dict[Any, Any] = {}
        self._outs: dict[Any, Any] = {}  # planning: each program's output shapes
        self._pool: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def planning(self, workers: int = 2) -> Iterator[None]:
        """Inside: a call runs nothing; it loads the kept program or lowers it and hands its compile to a pool of
        `workers` threads (XLA's compile releases the GIL, so the stages compile side by side), and returns zeros
        of the program's output shapes, so a dry run of a pipeline call sees every stage's inputs before any runs.
        The real call after it then waits for each compile. A program whose real inputs differ from the dry run's
        compiles again: the plan never changes what runs."""
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="wurst_jax-compile")
        try:
            yield
        finally:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False)

    def _plan(self, key: Any, name: str, fn: Callable, jitted: Any, static: dict[str, Any], args: tuple) -> Any:
        if key not in self._executables:
            exe = warm.load_executable(name, fn, static, args)
            if exe is not None:
                self._executables[key], self._outs[key] = exe, exe.out_info
            else:
                lowered = jitted.lower(*args, **static)
                self._outs[key] = lowered.out_info
                self._executables[key] = self._pool.submit(  # type: ignore[union-attr]
                    warm.compile_and_keep, name, fn, static, args, lowered.compile
                )
        return jax.tree_util.tree_map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), self._outs[key])

    def __call__(
        self, name: str, fn: Callable, static: dict[str, Any], *args: Any, detail: str = "", report: bool = True
    ) -> Any:
        """`fn(*args, **static)` compiled (the first time for this shape) and run; `static` are hashable keyword
        arguments (modules, samplers, flags) that select the program. `report=False`: no progress lines (small
        helper programs such as a stage's noise)."""
        jitted = self._jitted.setdefault(fn, jax.jit(fn, static_argnames=tuple(static)))
        key = (name, fn, tuple(sorted(static.items())), _signature(args))
        if self._pool is not None:
            return self._plan(key, name, fn, jitted, static, args)
        exe = self._executables.get(key)
        if isinstance(exe, Future):  # compiling since the dry run (`planning`)
            t0 = time.perf_counter()
            exe = self._executables[key] = exe.result()
            if self.progress and report:
                how = ", ".join(([detail] if detail else []) + ["compiled ahead, side by side: the time waited"])
                say(f"{name}: compiled in {time.perf_counter() - t0:.2f} s ({how})")
        if exe is None:
            t0 = time.perf_counter()
            exe = warm.load_executable(name, fn, static, args)  # kept by an earlier process: no tracing
            kept = exe is not None
            if not kept:
                exe = warm.compile_and_keep(name, fn, static, args, lambda: jitted.lower(*args, **static).compile())
            self._executables[key] = exe
            if self.progress and report:
                how = ", ".join(([detail] if detail else []) + (["kept from an earlier run"] if kept else []))
                say(f"{name}: compiled in {time.perf_counter() - t0:.2f} s" + (f" ({how})" if how else ""))
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        in_use = device_memory_in_use()
        _PEAK[0] = max(_PEAK[0], in_use)
        if self.progress and report:
            what = f"{name}: {detail + ': ' if detail else ''}"
            say(f"{what}ran in {time.perf_counter() - t0:.2f} s, {in_use / 2**20:.0f} MiB in use")
        return out


def _signature(args: tuple) -> Any:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None)) for x in leaves)


def device_memory_in_use() -> int:
    """Bytes in use on this process's first device: the allocator's figure where the backend reports one (GPU,
    TPU), else the bytes of the live jax array shards on it (weights, inputs, outputs; not XLA's temporaries)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return sum(
        s.data.nbytes
        for x in jax.live_arrays()
        if not x.is_deleted()
        for s in x.addressable_shards
        if s.device == device
    )


def peak_device_memory(reset: bool = False) -> int:
    """The highest `device_memory_in_use` seen right after a pipeline stage ran (GPU/TPU: the allocator's peak)."""
    stats = jax.local_devices()[0].memory_stats()
    peak = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else _PEAK[0]
    if reset:
        _PEAK[0] = 0
    return peak


CACHE_ENV = "WURST_JAX_CACHE_DIR"  # a folder, or "off" (also "", "0", "none", "false"): no persistent cache
_OFF = ("", "0", "off", "none", "false")
_CHOSEN = [False]  # a command chose (`use_compilation_cache`, also `--no-cache`): the pipelines keep that choice


def default_cache_dir() -> Path | None:
    """The per-user compilation cache folder: $WURST_JAX_CACHE_DIR, else ($XDG_CACHE_HOME or ~/.cache)/wurst_jax/jax;
    None when the environment variable turns it off."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wurst_jax" / "jax"


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Persist compiled executables in `path`, so a new process skips compilation for programs seen before.

    JAX keys each entry by the program's HLO, the compile options, the jax/jaxlib version and the device kind and
    count, so a different jax, device or model shape never reuses a wrong program (it compiles and adds an entry)."""
    path = str(path)
    if jax.config.jax_compilation_cache_dir == path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:  # jax reads the folder once, at the first compile: after one, start over so this folder is used
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # a jax without it: the folder applies from the next process on
        pass


def use_compilation_cache(path: str | os.PathLike | None = None, enabled: bool = True) -> Path | None:
    """The persistent compilation cache as the commands set it up: `path` (`--cache-dir`) or the per-user default
    (`default_cache_dir`); `enabled=False` (`--no-cache`) leaves it off. Returns the folder in use, or None. The
    default folder is skipped with a note when it cannot be made; an explicit `path` that cannot be made raises."""
    _CHOSEN[0] = True
    if not enabled:
        return None
    target = Path(path).expanduser() if path else default_cache_dir()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if path:
            raise OSError(f"--cache-dir {path}: cannot create the compilation cache folder ({e})") from e
        say(f"no persistent compilation cache: cannot create {target} ({e}); set {CACHE_ENV}")
        return None
    enable_compilation_cache(target)
    return target


def default_compilation_cache() -> Path | None:
    """For the Python pipelines: the per-user cache, unless the caller already chose a folder (jax's
    `jax_compilation_cache_dir`, `enable_compilation_cache`, a command's `--cache-dir` / `--no-cache`) or
    $WURST_JAX_CACHE_DIR turns it off."""
    current = jax.config.jax_compilation_cache_dir
    if current or _CHOSEN[0]:
        return Path(current) if current else None
    return use_compilation_cache()
