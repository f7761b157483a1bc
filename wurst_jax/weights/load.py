"""`load_component`: a diffusers / transformers component folder → (Flax module, variables).

The folder's `config.json` decides the module and its config (`_class_name` for diffusers models,
`architectures` / `model_type` for transformers' CLIP text model); the weights are
`diffusion_pytorch_model.safetensors` or `model.safetensors`, optionally sharded with an `*.index.json`.
A converted folder (`config.json` + `orbax/`, written by `wurst-jax convert`) is restored from orbax instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from wurst_jax.models import (
    CLIPTextConfig,
    CLIPTextModel,
    EfficientNetConfig,
    EfficientNetEncoder,
    PaellaVQModel,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    abstract_variables,
)
from wurst_jax.sharding import check_heads, param_shardings, place_fn
from wurst_jax.weights.convert import TensorRef, convert, state_dict_source
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.orbax_io import ORBAX_DIR, is_orbax_component, restore_variables
from wurst_jax.weights.safetensors_io import iter_tensors, weight_files

# component kind → (module class, config class, weights file stem, source keys dropped silently, root module)
_KINDS: dict[str, tuple[type[nn.Module], type, str, tuple[str, ...], str]] = {
    "prior": (WuerstchenPrior, StageCConfig, "diffusion_pytorch_model", (), ""),
    "decoder": (WuerstchenDiffNeXt, StageBConfig, "diffusion_pytorch_model", (), ""),
    "vqgan": (PaellaVQModel, StageAConfig, "diffusion_pytorch_model", (), ""),
    "text_encoder": (CLIPTextModel, CLIPTextConfig, "model", (r"position_ids$", r"^text_projection\."), "text_model."),
    "effnet": (EfficientNetEncoder, EfficientNetConfig, "diffusion_pytorch_model", (), ""),
}
_CLASS_NAMES = {
    "WuerstchenPrior": "prior",
    "WuerstchenDiffNeXt": "decoder",
    "PaellaVQModel": "vqgan",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder",
    "EfficientNetEncoder": "effnet",
}
KINDS = tuple(_KINDS)


def read_config(folder: str | Path) -> tuple[str, Any]:
    """`config.json` of a component folder → (kind, config dataclass)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder}: no config.json (expected a diffusers or transformers component folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    names = [raw.get("_class_name"), *(raw.get("architectures") or [])]
    if raw.get("model_type") == "clip_text_model":
        names.append("CLIPTextModel")
    kind = next((_CLASS_NAMES[n] for n in names if n in _CLASS_NAMES), None)
    if kind is None:
        known = ", ".join(_CLASS_NAMES)
        raise WeightsError(
            f"{path}: not a Würstchen component (class {names[0] or raw.get('model_type')!r}; known: {known})"
        )
    return kind, config_from_dict(_KINDS[kind][1], raw, str(path))


def config_from_dict(cls: type, raw: Mapping[str, Any], name: str) -> Any:
    """Build a config dataclass from a config.json dict, keeping the keys the dataclass knows."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in raw:
            value = raw[field.name]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{name}: invalid {cls.__name__}: {e}") from None


def build_module(kind: str, config: Any, dtype: Any = jnp.float32, param_dtype: Any = None) -> nn.Module:
    if kind not in _KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    return _KINDS[kind][0](config, dtype=dtype, param_dtype=param_dtype or dtype)


def _check_dtype(dtype: Any) -> None:
    if not jnp.issubdtype(np.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype such as jnp.float32 or jnp.bfloat16, got {dtype!r}")


def source_layout(kind: str) -> tuple[str, tuple[str, ...], str]:
    """(weights file stem, regexes of source keys dropped silently, root module name) of a component kind."""
    if kind not in _KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    return _KINDS[kind][2:]


def load_component(
    path: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    sharding: str | None = None,
) -> tuple[nn.Module, dict]:
    """Load a component folder (prior/, decoder/, vqgan/, text_encoder/, an effnet) as `(module, variables)`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`). Tensors are read
    one at a time; every key and shape is checked before the first is read. A converted folder (`orbax/` next to
    `config.json`) is restored from orbax, cast to `param_dtype` if it was saved in another dtype. With a `mesh`,
    every parameter is placed straight into its sharding for `sharding` ("dp" by default, "fsdp" or "tp"; see
    `wurst_jax.sharding`); without one, on the default device.
    """
    _check_dtype(dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory")
    kind, config = read_config(folder)
    module = build_module(kind, config, dtype, param_dtype)
    target, shardings = _target(module, folder, mesh, sharding)
    if is_orbax_component(folder):
        return module, restore_variables(folder / ORBAX_DIR, target, shardings)
    stem, ignore, root = source_layout(kind)
    files = weight_files(folder, stem)
    source = {k: TensorRef(f.shape(k), (lambda f=f, k=k: f.get(k))) for k, f in iter_tensors(files)}
    label = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    place = None if shardings is None else place_fn(shardings)
    return module, convert(source, target, label, ignore, root, place=place)


def _target(module: nn.Module, folder: Path, mesh: Mesh | None, sharding: str | None) -> tuple[Any, Any]:
    """The abstract variables of `module` and, with a mesh, their NamedShardings (else None)."""
    if sharding is not None and mesh is None:
        raise ValueError(f"sharding={sharding!r} needs a mesh (wurst_jax.make_mesh(...))")
    try:
        boxed = abstract_variables(module, boxed=True)
    except Exception as e:  # a config that passes the dataclass checks but cannot build the network
        name = type(module.config).__name__
        raise WeightsError(f"{folder / 'config.json'}: this {name} cannot build a model: {e!r}") from None
    if mesh is None:
        return nn.meta.unbox(boxed), None
    mode = sharding or "dp"
    check_heads(module, mesh, mode)
    return nn.meta.unbox(boxed), param_shardings(boxed, mesh, mode)


def convert_state_dict(state_dict: Mapping[str, Any], module: nn.Module, name: str = "state_dict") -> dict:
    """Convert an in-memory PyTorch state dict (diffusers or original-repo names) for `module`.

    Values may be torch tensors (f32 / f16 / bf16) or numpy arrays; the result is the module's variables tree.
    """
    kind = next((k for k, v in _KINDS.items() if isinstance(module, v[0])), None)
    if kind is None:
        raise TypeError(f"not a wurst_jax model: {type(module).__name__}")
    _, ignore, root = source_layout(kind)
    return convert(state_dict_source(state_dict), abstract_variables(module), name, ignore, root)
