"""Flax variables → a diffusers / transformers component folder that PyTorch loads with `from_pretrained`.

The inverse of loading, by the same rule (`layout.py`): each Flax path gets back its PyTorch key and layout, and
BatchNorm statistics get the `num_batches_tracked` counter PyTorch keeps; the config.json names the class the
component registry gives the module. The safetensors file is written tensor by tensor (the header first,
from the shapes), so exporting never holds a second copy of the model in host memory.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from wurst_jax.dtypes import is_float
from wurst_jax.models import abstract_variables, registry
from wurst_jax.weights import layout
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.safetensors_io import DTYPES as _READ_DTYPES

_ST_DTYPES = {np.dtype(v): k for k, v in _READ_DTYPES.items()}
# The version written into diffusers' config.json when diffusers is not installed (the one the layout was
# checked against).
_DIFFUSERS_VERSION = "0.42.1"


def torch_key(path: tuple[str, ...]) -> str:
    """A Flax variable path → its diffusers / transformers state-dict key (inverse of `layout.flax_candidates`)."""
    key = layout.torch_key(path)
    if key is None:
        raise WeightsError(f"no PyTorch name for the Flax variable {'/'.join(path)}")
    return key


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
        dt = np.dtype(dtype) if dtype is not None and is_float(src_dtype) else src_dtype
        shape = layout.torch_shape(path, tuple(leaf.shape))
        read = lambda leaf=leaf, path=path, dt=dt: np.asarray(layout.to_torch(path, np.asarray(leaf)), dt)
        out.append((key, shape, dt, read))
        if path[0] == "batch_stats" and path[-1] == "mean":
            zero = np.zeros((), np.int64)
            out.append((key.rsplit(".", 1)[0] + ".num_batches_tracked", (), zero.dtype, lambda z=zero: z))
    return out


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
    """The config.json diffusers (or transformers) expects for `module`: its registry spec's class name and the
    config's fields."""
    spec = registry.for_module(module)
    fields = {k: _jsonable(v) for k, v in dataclasses.asdict(module.config).items()}
    if spec.library == "transformers":
        return {
            "architectures": [spec.class_names[0]],
            "model_type": spec.model_type,
            **fields,
            "dtype": np.dtype(dtype or module.param_dtype).name,
            "transformers_version": _version("transformers", "5.0.0"),
        }
    return {
        "_class_name": spec.class_names[0],
        "_diffusers_version": _version("diffusers", _DIFFUSERS_VERSION),
        **fields,
    }


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


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
    spec = registry.for_module(module)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = torch_tensors(module, variables, dtype)
    write_safetensors(folder / f"{spec.weights_stem}.safetensors", tensors)
    config = component_config(module, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return folder
