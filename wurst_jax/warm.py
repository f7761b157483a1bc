"""Warm starts: a later process reuses what an earlier one traced, kept in the persistent compilation cache folder.

jax's persistent compilation cache skips only XLA's compile: a new process still traces and lowers every program
(the pipelines' stage loops: most of a warm `wurst-jax generate`), and finds each component's variable tree by
tracing `module.init` (`jax.eval_shape`). This module keeps both in `<cache folder>/traced/`, keyed by what decides
them, so a later process needs no tracing at all:
- `load_executable` / `compile_and_keep`: a compiled program, serialised by `jax.experimental.serialize_executable`,
  keyed by the function, the repr of its static arguments (modules, samplers) and its input signature (tree
  structure, shapes, dtypes, weak types, shardings).
- `abstract_variables`: `wurst_jax.models.abstract_variables(module, boxed=True)`, keyed by the module's repr.
Every key also holds `fingerprint()`: the jax / jaxlib / flax versions, the backend, its devices and platform
version, XLA_FLAGS and the jax flags that change programs, and a hash of wurst_jax's own source files, so a changed
install, machine or code never reuses an entry. A static argument whose repr names an object address (`<… at 0x…>`,
a closure) has no stable key: such a call is not kept, nor is a program whose inputs span several devices (sharded).
Nothing is kept without a persistent cache folder (`--no-cache`) or with several processes (multi-host); an
unreadable entry is ignored and written again.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

_FINGERPRINT: list[str] = []


def fingerprint() -> str:
    """What every entry depends on besides its own key (computed once per process)."""
    if not _FINGERPRINT:
        import flax
        import jaxlib

        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        devices = jax.devices()
        env = [jax.__version__, jaxlib.__version__, flax.__version__, jax.default_backend(), str(len(devices))]
        env += [devices[0].device_kind, str(getattr(devices[0].client, "platform_version", ""))]
        env += [os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", "")]
        env += [str(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision)]
        h.update("\0".join(env).encode())
        _FINGERPRINT.append(h.hexdigest())
    return _FINGERPRINT[0]


def folder() -> Path | None:
    """`<persistent cache folder>/traced`, or None (no persistent cache, or a multi-process run)."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or jax.process_count() > 1:
        return None
    return Path(cache) / "traced"


def describe(value: Any) -> str | None:
    """A stable text for a static argument, or None when it has none (an object address, a closure)."""
    if callable(value) and hasattr(value, "__qualname__") and not hasattr(value, "__dataclass_fields__"):
        name = f"{value.__module__}.{value.__qualname__}"
        return None if "<" in name else name  # <lambda>, <locals>: what they capture is not in the name
    text = repr(value)
    return None if " at 0x" in text else text


def signature(args: Any) -> str:
    """The input signature a compiled program is specific to."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    rows = [str(tree)]
    for x in leaves:
        dtype = getattr(x, "dtype", None)
        rows.append(f"{np.shape(x)}|{dtype if dtype is not None else type(x).__name__}|")
        rows[-1] += f"{getattr(x, 'weak_type', None)}|{getattr(x, 'sharding', None)}"
    return "\n".join(rows)


def _path(kind: str, parts: list[str | None]) -> Path | None:
    where = folder()
    if where is None or any(p is None for p in parts):
        return None
    key = hashlib.sha256("\0".join([fingerprint(), kind, *parts]).encode()).hexdigest()  # type: ignore[list-item]
    return where / f"{kind}-{key}"


def _read(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # a partial or foreign file: treated as absent, written again
        return None


def _write(path: Path | None, value: Any) -> None:
    if path is None:
        return
    try:
        data = pickle.dumps(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the whole entry or none
    except Exception:  # a read-only folder, an object that does not pickle: the next run traces again
        return


def device_of(args: tuple) -> Any:
    """The one device all array inputs sit on, or None (several devices: a sharded program, not kept; its
    executable would need the mesh's device order to load)."""
    devices = {d for x in jax.tree_util.tree_leaves(args) if hasattr(x, "sharding") for d in x.sharding.device_set}
    return devices.pop() if len(devices) == 1 else None


def _executable_path(name: str, fn: Any, static: dict[str, Any], args: tuple) -> Path | None:
    if folder() is None or device_of(args) is None:
        return None
    statics = [f"{k}={describe(v)}" if describe(v) is not None else None for k, v in sorted(static.items())]
    return _path("exe", [name, describe(fn), *statics, signature(args)])


def load_executable(name: str, fn: Any, static: dict[str, Any], args: tuple) -> Any:
    """The compiled `fn(*args, **static)` a previous process kept, or None."""
    path = _executable_path(name, fn, static, args)
    entry = _read(path)
    if entry is None:
        return None
    from jax.experimental import serialize_executable

    try:  # on the inputs' device (by default jax would load it for all of the backend's devices)
        return serialize_executable.deserialize_and_load(*entry, execution_devices=[device_of(args)])
    except Exception:
        return None


def compile_and_keep(name: str, fn: Any, static: dict[str, Any], args: tuple, compile: Callable[[], Any]) -> Any:
    """`compile()` (lower + compile of `fn(*args, **static)`), kept for later processes when it has a stable key.

    A kept program is compiled with jax's persistent cache off: an executable jax loaded from its cache does not
    serialise again whole (XLA:CPU keeps only the loaded kernels, and a later process that loads such a copy fails
    with "Function … not found"), so a fresh compile is the one to keep. It costs one compile per program after a
    change of code or versions, which the first run pays anyway."""
    path = _executable_path(name, fn, static, args)
    if path is None:
        return compile()
    from jax._src import config as jax_config
    from jax.experimental import serialize_executable

    with jax_config.enable_compilation_cache(False):
        compiled = compile()
    try:
        entry = serialize_executable.serialize(compiled)
    except Exception:  # a backend that cannot serialise its executables
        return compiled
    _write(path, entry)
    return compiled


def abstract_variables(module: Any) -> Any:
    """`models.abstract_variables(module, boxed=True)`, from the cache folder when an earlier process traced it."""
    from wurst_jax.models import abstract_variables as trace

    path = _path("vars", [type(module).__module__, type(module).__qualname__, describe(module)])
    tree = _read(path)
    if tree is None:
        tree = trace(module, boxed=True)
        _write(path, tree)
    return tree
