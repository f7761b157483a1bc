"""`load_component`: a diffusers / transformers component folder → (Flax module, variables).

The folder's `config.json` decides the module and its config (`_class_name` for diffusers models,
`architectures` / `model_type` for transformers' CLIP text model); the weights are
`diffusion_pytorch_model.safetensors` or `model.safetensors`, optionally sharded with an `*.index.json`.
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

from wurst_jax.models import (
    CLIPTextConfig,
    CLIPTextModel,
    PaellaVQModel,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    abstract_variables,
)
from wurst_jax.weights.convert import TensorRef, convert, state_dict_source
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.safetensors_io import iter_tensors, weight_files

# component kind → (module class, config class, weights file stem, source keys dropped silently, root module)
_KINDS: dict[str, tuple[type[nn.Module], type, str, tuple[str, ...], str]] = {
    "prior": (WuerstchenPrior, StageCConfig, "diffusion_pytorch_model", (), ""),
    "decoder": (WuerstchenDiffNeXt, StageBConfig, "diffusion_pytorch_model", (), ""),
    "vqgan": (PaellaVQModel, StageAConfig, "diffusion_pytorch_model", (), ""),
    "text_encoder": (CLIPTextModel, CLIPTextConfig, "model", (r"position_ids$", r"^text_projection\."), "text_model."),
}
_CLASS_NAMES = {
    "WuerstchenPrior": "prior",
    "WuerstchenDiffNeXt": "decoder",
    "PaellaVQModel": "vqgan",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder",
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


def load_component(path: str | Path, dtype: Any = jnp.float32, param_dtype: Any = None) -> tuple[nn.Module, dict]:
    """Load a component folder (prior/, decoder/, vqgan/, text_encoder/) as `(module, variables)`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`). Tensors are read
    one at a time; every key and shape is checked before the first is read.
    """
    _check_dtype(dtype)
    folder = Path(path)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory")
    kind, config = read_config(folder)
    module = build_module(kind, config, dtype, param_dtype)
    _, _, stem, ignore, root = _KINDS[kind]
    files = weight_files(folder, stem)
    source = {k: TensorRef(f.shape(k), (lambda f=f, k=k: f.get(k))) for k, f in iter_tensors(files)}
    label = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    try:
        target = abstract_variables(module)
    except Exception as e:  # a config that passes the dataclass checks but cannot build the network
        name = type(config).__name__
        raise WeightsError(f"{folder / 'config.json'}: this {name} cannot build a model: {e!r}") from None
    return module, convert(source, target, label, ignore, root)


def convert_state_dict(state_dict: Mapping[str, Any], module: nn.Module, name: str = "state_dict") -> dict:
    """Convert an in-memory PyTorch state dict (diffusers or original-repo names) for `module`.

    Values may be torch tensors (f32 / f16 / bf16) or numpy arrays; the result is the module's variables tree.
    """
    kind = next((k for k, v in _KINDS.items() if isinstance(module, v[0])), None)
    if kind is None:
        raise TypeError(f"not a wurst_jax model: {type(module).__name__}")
    _, _, _, ignore, root = _KINDS[kind]
    return convert(state_dict_source(state_dict), abstract_variables(module), name, ignore, root)
