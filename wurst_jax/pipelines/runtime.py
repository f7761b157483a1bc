"""What running a pipeline needs around the models: compiled functions cached per shape, progress lines, device
memory figures, and the persistent compilation cache.

`CompileCache` belongs to a pipeline (the stages of one pipeline share it): it jits a function once, lowers and
compiles it explicitly per (static arguments, input shapes and shardings) so compile time and run time are
reported apart, and reuses the executable on later calls.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_PEAK = [0]  # the process-wide high-water mark of `device_memory_in_use` (CPU: no allocator statistics)


def say(msg: str) -> None:
    print(f"[wurst_jax] {msg}", file=sys.stderr, flush=True)


class CompileCache:
    """Executables of the pipeline's stage functions, compiled once per shape; optional progress lines."""

    def __init__(self, progress: bool = False):
        self.progress = progress
        self._jitted: dict[Any, Any] = {}
        self._executables: dict[Any, Any] = {}

    def __call__(self, name: str, fn: Callable, static: dict[str, Any], *args: Any, detail: str = "") -> Any:
        """`fn(*args, **static)` compiled (the first time for this shape) and run; `static` are hashable keyword
        arguments (modules, samplers, flags) that select the program."""
        jitted = self._jitted.setdefault(fn, jax.jit(fn, static_argnames=tuple(static)))
        key = (name, fn, tuple(sorted(static.items())), _signature(args))
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = self._executables[key] = jitted.lower(*args, **static).compile()
            if self.progress:
                say(f"{name}: compiled in {time.perf_counter() - t0:.2f} s" + (f" ({detail})" if detail else ""))
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        in_use = device_memory_in_use()
        _PEAK[0] = max(_PEAK[0], in_use)
        if self.progress:
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


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Persist compiled executables in `path`, so a new process skips compilation for shapes seen before."""
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
