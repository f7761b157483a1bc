"""Flax variables → a diffusers / transformers component folder that PyTorch loads with `from_pretrained`.

The exact inverse of `convert.py`: each Flax path gets back its diffusers key (`blocks_3/attention/to_q/kernel` →
`blocks.3.attention.to_q.weight`; every `_<n>` suffix of a module name was a list index), checked by running the
forward rename on the result; kernels go back to PyTorch layouts (HWIO → OIHW, dense [in, out] → [out, in]),
`scale` / `embedding` become `weight`, BatchNorm statistics become `running_mean` / `running_var` plus the
`num_batches_tracked` counter PyTorch keeps. The safetensors file is written tensor by tensor (the header first,
from the shapes), so exporting never holds a second copy of the model in host memory.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_dtypes
import numpy as np
from flax import traverse_util

from wurst_jax.models import (
    CLIPTextModel,
    EfficientNetEncoder,
    PaellaVQModel,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    abstract_variables,
)
from wurst_jax.weights.convert import _torch_shape, flax_candidates
from wurst_jax.weights.errors import WeightsError

Path_ = tuple[str, ...]

# same names as the PyTorch classes (EfficientNetEncoder: the one in diffusers' Würstchen training example)
_DIFFUSERS_CLASSES = {c: c.__name__ for c in (WuerstchenPrior, WuerstchenDiffNeXt, PaellaVQModel, EfficientNetEncoder)}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_STATS = {"mean": "running_mean", "var": "running_var"}
_INDEX_SUFFIX = re.compile(r"((?:_\d+)+)$")
_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}
# The version written into diffusers' config.json when diffusers is not installed (the one the layout was
# checked against).
_DIFFUSERS_VERSION = "0.42.1"


def torch_key(path: Path_) -> str:
    """A Flax variable path → its diffusers / transformers state-dict key (inverse of `flax_candidates`)."""
    collection, *mods, leaf = path
    parts = []
    for m in mods:
        match = _INDEX_SUFFIX.search(m)
        if match:
            parts.append(m[: match.start()])
            parts += match.group(1)[1:].split("_")
        else:
            parts.append(m)
    if collection == "batch_stats":
        name = _STATS.get(leaf)
    elif collection == "params":
        name = _LEAVES.get(leaf, leaf)
    else:
        name = None
    key = ".".join([*parts, name or leaf])
    if name is None or path not in flax_candidates(key):
        raise WeightsError(f"no PyTorch name for the Flax variable {'/'.join(path)} (it would become {key!r})")
    return key


def to_torch_layout(path: Path_, x: np.ndarray) -> np.ndarray:
    """Inverse of `convert.to_flax_layout`: HWIO → OIHW, [in, out] → [out, in]."""
    if path[-1] == "kernel" and x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and x.ndim == 2:
        return x.T
    return x


def torch_tensors(module: nn.Module, variables: Any, dtype: Any = None) -> list[tuple[str, tuple, np.dtype, Callable]]:
    """(key, shape, dtype, read) for every PyTorch tensor of `variables`; `read()` gives the array in torch layout.

    The variables must have exactly the module's structure and shapes. `dtype` casts floating tensors.
    """
    want = traverse_util.flatten_dict(abstract_variables(module))
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables))
    missing = sorted("/".join(p) for p in want if p not in flat)
    extra = sorted("/".join(p) for p in flat if p not in want)
    shapes = [
        f"{'/'.join(p)}: {tuple(flat[p].shape)}, model expects {tuple(t.shape)}"
        for p, t in want.items()
        if p in flat and tuple(flat[p].shape) != tuple(t.shape)
    ]
    if missing or extra or shapes:
        raise WeightsError(
            f"the variables do not fit {type(module).__name__}: missing {missing}, unexpected {extra}, "
            f"mis-shaped {shapes}"
        )
    out = []
    for path, leaf in flat.items():
        key = torch_key(path)  # CLIP keeps `text_model.`: the Hub layout, which transformers 4 and 5 both load
        src_dtype = np.dtype(leaf.dtype)
        dt = np.dtype(dtype) if dtype is not None and _is_float(src_dtype) else src_dtype
        shape = _torch_shape(path, tuple(leaf.shape))
        read = lambda leaf=leaf, path=path, dt=dt: np.asarray(to_torch_layout(path, np.asarray(leaf)), dt)
        out.append((key, shape, dt, read))
        if path[0] == "batch_stats" and path[-1] == "mean":
            zero = np.zeros((), np.int64)
            out.append((key.rsplit(".", 1)[0] + ".num_batches_tracked", (), zero.dtype, lambda z=zero: z))
    return out


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)


def write_safetensors(
    path: str | os.PathLike, tensors: Iterable[tuple[str, tuple, np.dtype, Callable]], metadata: dict | None = None
) -> Path:
    """Write a safetensors file from (key, shape, dtype, read) entries, reading one tensor at a time."""
    path = Path(path)
    entries, offset = [], 0
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    for key, shape, dt, read in tensors:
        if np.dtype(dt) not in _ST_DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {dt}, which safetensors export does not support")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[key] = {"dtype": _ST_DTYPES[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        entries.append((key, tuple(shape), np.dtype(dt), read, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dt, read, n in entries:
            arr = np.asarray(read(), dtype=dt)
            arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
            if arr.shape != shape or arr.nbytes != n:
                raise WeightsError(f"{path}: tensor {key!r} reads as {arr.shape}, expected {shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return path


def component_config(module: nn.Module, dtype: Any = None) -> dict:
    """The config.json diffusers (or transformers, for the CLIP text model) expects for `module`."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(module.config).items()}
    if isinstance(module, CLIPTextModel):
        name = np.dtype(dtype or module.param_dtype).name
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **fields,
            "dtype": name,
            "transformers_version": _version("transformers", "5.0.0"),
        }
    cls = next((n for c, n in _DIFFUSERS_CLASSES.items() if isinstance(module, c)), None)
    if cls is None:
        raise TypeError(f"not a wurst_jax model: {type(module).__name__}")
    return {"_class_name": cls, "_diffusers_version": _version("diffusers", _DIFFUSERS_VERSION), **fields}


def _version(package: str, default: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return default


def export_component(module: nn.Module, variables: Any, folder: str | os.PathLike, dtype: Any = None) -> Path:
    """Write `variables` of `module` as a diffusers / transformers component folder (config.json + safetensors).

    The result loads with `diffusers.pipelines.deprecated.wuerstchen.WuerstchenPrior.from_pretrained(folder)`
    (or `WuerstchenDiffNeXt`, `PaellaVQModel`, `transformers.CLIPTextModel`). `dtype` (e.g. `np.float32`) casts
    floating tensors; by default they keep the variables' dtype. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "model" if isinstance(module, CLIPTextModel) else "diffusion_pytorch_model"
    tensors = torch_tensors(module, variables, dtype)
    write_safetensors(folder / f"{stem}.safetensors", tensors)
    config = component_config(module, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return folder
