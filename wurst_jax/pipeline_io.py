"""What the pipelines need around the models: folders → components, compiled-function cache, PIL output.

`compiled` jits a function once per (static arguments, input shapes), lowers and compiles it explicitly so the
compile time and the run time can be reported apart, and reuses the executable on later calls.
`Component` holds a module and its variables; with `offload=True` the variables live in host memory and are
put on the device only while their stage runs (the JAX form of diffusers' model offloading).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from wurst_jax import scheduler as sched
from wurst_jax.weights import WeightsError, load_component


@dataclasses.dataclass
class Component:
    """A loaded stage: `module` and its `variables` (on the device, or on the host when `offload`)."""

    module: nn.Module
    variables: Any
    offload: bool = False

    def __post_init__(self):
        self.shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.variables)
        if self.offload:
            if not all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(self.variables)):
                raise ValueError("offload=True keeps whole stages in this host's memory: not available across hosts")
            self.variables = jax.device_get(self.variables)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[Any]:
        if not self.offload:
            yield self.variables
            return
        on_device = jax.device_put(self.variables, self.shardings)
        try:
            yield on_device
        finally:
            for leaf in jax.tree_util.tree_leaves(on_device):
                leaf.delete()


_CACHE: dict[Any, Any] = {}
_JITTED: dict[Any, Any] = {}
_PEAK = [0]


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


def compiled(name: str, fn: Callable, static: tuple[int, ...], progress: bool = False, detail: str = "") -> Callable:
    """`fn` jitted with `static` positional arguments; each call reports compile (first time) and run seconds."""

    def call(*args):
        jitted = _JITTED.setdefault((name, fn), jax.jit(fn, static_argnums=static))
        dynamic = [a for i, a in enumerate(args) if i not in static]
        key = (name, fn, tuple(args[i] for i in static), _signature(dynamic))
        exe = _CACHE.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = _CACHE[key] = jitted.lower(*args).compile()
            if progress:
                _say(f"{name}: compiled in {time.perf_counter() - t0:.2f} s" + (f" ({detail})" if detail else ""))
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*dynamic))
        in_use = device_memory_in_use()
        _PEAK[0] = max(_PEAK[0], in_use)
        if progress:
            what = f"{name}: {detail + ': ' if detail else ''}"
            _say(f"{what}ran in {time.perf_counter() - t0:.2f} s, {in_use / 2**20:.0f} MiB in use")
        return out

    return call


def _signature(args: list[Any]) -> Any:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None)) for x in leaves)


def _say(msg: str) -> None:
    print(f"[wurst_jax] {msg}", file=sys.stderr, flush=True)


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Persist compiled executables in `path`, so a new process skips compilation for shapes seen before."""
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def resolve(path: str | os.PathLike) -> Path:
    """A local folder, or a Hub id (`org/name`) downloaded with huggingface_hub when a network exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path)))
        except Exception as e:  # no network, unknown repo, no access: say which and why
            raise WeightsError(f"{path}: not a local folder, and downloading it from the Hub failed: {e}") from None
    raise WeightsError(f"{path}: no such folder")


def load_pipeline_folder(
    path: str | os.PathLike,
    parts: tuple[str, ...],
    dtype: Any,
    offload: bool,
    prefix: str = "",
    mesh: Any = None,
    sharding: str | None = None,
) -> dict[str, Any]:
    """Load `parts` (component folder names, with `prefix` as in a combined folder) from a pipeline folder."""
    from transformers import AutoTokenizer

    root = resolve(path)
    missing = [prefix + p for p in parts if not (root / (prefix + p)).is_dir()]
    if missing:
        raise WeightsError(f"{root}: missing component folder(s) {missing}; expected {[prefix + p for p in parts]}")
    out: dict[str, Any] = {"config": {}}
    index = root / "model_index.json"
    if index.is_file():
        out["config"] = json.loads(index.read_text())
    sched_file = root / f"{prefix}scheduler" / "scheduler_config.json"
    out["scheduler"] = (
        sched.SchedulerConfig.from_dict(json.loads(sched_file.read_text()))
        if sched_file.is_file()
        else sched.SchedulerConfig()
    )
    for part in parts:
        folder = root / (prefix + part)
        if part == "tokenizer":
            out[part] = AutoTokenizer.from_pretrained(str(folder))
        else:
            out[part] = Component(*load_component(folder, dtype, mesh=mesh, sharding=sharding), offload=offload)
    return out


def to_pil(images: np.ndarray) -> list:
    """[N, H, W, 3] floats in [0, 1] → PIL images (rounded as diffusers' `numpy_to_pil`)."""
    from PIL import Image

    return [Image.fromarray(img) for img in (np.asarray(images) * 255).round().astype(np.uint8)]
