"""`load_component`: a diffusers / transformers component folder → (Flax module, variables).

The folder's `config.json` names the component kind through the registry (`wurst_jax.models.registry`); the
weights are `diffusion_pytorch_model.safetensors` or `model.safetensors`, optionally sharded with an
`*.index.json`. A converted folder (`config.json` + `orbax/`, written by `wurst-jax convert`) is restored from
orbax instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import Mesh

from wurst_jax import warm
from wurst_jax.dtypes import is_float
from wurst_jax.models import abstract_variables, registry
from wurst_jax.sharding import ShardingPlan
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.mapping import state_dict_source, to_variables
from wurst_jax.weights.orbax_io import ORBAX_DIR, is_orbax_component, restore_variables
from wurst_jax.weights.sources import Source, open_folder, read_config

KINDS = registry.kinds()


def build_module(kind: str, config: Any, dtype: Any = jnp.float32, param_dtype: Any = None) -> nn.Module:
    return registry.get(kind).build(config, dtype, param_dtype)


def _check_dtype(dtype: Any) -> None:
    if not is_float(dtype):
        raise ValueError(f"dtype must be a floating dtype such as jnp.float32 or jnp.bfloat16, got {dtype!r}")


def load_component(
    path: str | Path,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    sharding: str | None = None,
    variant: str | None = None,
) -> tuple[nn.Module, dict]:
    """Load a component folder (prior/, decoder/, vqgan/, text_encoder/, an effnet) as `(module, variables)`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`). Tensors are read
    one at a time; every key and shape is checked before the first is read. A converted folder (`orbax/` next to
    `config.json`) is restored from orbax, cast to `param_dtype` if it was saved in another dtype. With a `mesh`,
    every parameter is placed straight into its sharding for `sharding` ("dp" by default, "fsdp" or "tp"; see
    `wurst_jax.sharding`); without one, on the default device. `variant` ("bf16") reads diffusers' variant weight
    files (`diffusion_pytorch_model.bf16.safetensors`, or the shards of `….safetensors.index.bf16.json`).
    """
    _check_dtype(dtype)
    if sharding is not None and mesh is None:
        raise ValueError(f"sharding={sharding!r} needs a mesh (wurst_jax.make_mesh(...))")
    return load_with_plan(path, ShardingPlan(mesh, sharding or "dp"), dtype, param_dtype, variant)


def load_with_plan(
    path: str | Path, plan: ShardingPlan, dtype: Any, param_dtype: Any = None, variant: str | None = None
) -> tuple[nn.Module, dict]:
    """`load_component` with the placement of a `ShardingPlan` (what the pipelines hold)."""
    folder = Path(path)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory")
    if is_orbax_component(folder):
        if variant is not None:
            raise WeightsError(f"{folder}: a converted (orbax) folder has no weight variants; drop variant={variant!r}")
        kind, config = read_config(folder)
        module = build_module(kind, config, dtype, param_dtype)
        target, shardings = _target(module, str(folder / "config.json"), plan)
        return module, restore_variables(folder / ORBAX_DIR, target, shardings)
    return module_from_source(open_folder(folder, variant), plan, dtype, param_dtype)


def module_from_source(source: Source, plan: ShardingPlan, dtype: Any, param_dtype: Any = None, place=None):
    """(module, variables) of an opened source; `place(path, array, like)` overrides the plan's placement."""
    module = source.spec.build(source.config, dtype, param_dtype)
    target, shardings = _target(module, str(source.config_json or source.label), plan)
    if place is None and shardings is not None:
        place = plan.place_fn(shardings)
    spec = source.spec
    return module, to_variables(
        source.tensors, target, source.label, spec.ignore, spec.root, place=place, renames=spec.renames
    )


def _target(module: nn.Module, config_name: str, plan: ShardingPlan) -> tuple[Any, Any]:
    """The abstract variables of `module` and, with a mesh, their NamedShardings (else None)."""
    try:
        boxed = warm.abstract_variables(module)  # traced once, then kept in the persistent cache folder
    except Exception as e:  # a config that passes the dataclass checks but cannot build the network
        raise WeightsError(f"{config_name}: this {type(module.config).__name__} cannot build a model: {e!r}") from None
    heads = registry.for_module(module).heads(module.config)
    return nn.meta.unbox(boxed), plan.param_shardings(boxed, heads, type(module).__name__)


def convert_state_dict(state_dict: Mapping[str, Any], module: nn.Module, name: str = "state_dict") -> dict:
    """Convert an in-memory PyTorch state dict (diffusers or original-repo names) for `module`.

    Values may be torch tensors (f32 / f16 / bf16) or numpy arrays; the result is the module's variables tree.
    """
    spec = registry.for_module(module)
    variables = abstract_variables(module)
    return to_variables(state_dict_source(state_dict), variables, name, spec.ignore, spec.root, renames=spec.renames)
