"""Flax modules of the three Würstchen stages, the CLIP text encoder and the EfficientNet semantic encoder (NHWC,
no file access)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from wurst_jax.models.effnet import EfficientNetConfig, EfficientNetEncoder
from wurst_jax.models.stage_a import PaellaVQModel, StageAConfig
from wurst_jax.models.stage_b import StageBConfig, WuerstchenDiffNeXt
from wurst_jax.models.stage_c import StageCConfig, WuerstchenPrior


def example_inputs(module: nn.Module) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Smallest inputs that create every parameter of `module` (parameter shapes do not depend on them)."""
    cfg = module.config
    f32 = jnp.float32
    s = jax.ShapeDtypeStruct
    if isinstance(module, WuerstchenPrior):
        return s((1, 4, 4, cfg.c_in), f32), s((1,), f32), s((1, 4, cfg.c_cond), f32)
    if isinstance(module, WuerstchenDiffNeXt):
        n = cfg.downscale
        return (
            s((1, n, n, cfg.c_in), f32),
            s((1,), f32),
            s((1, 4, 4, cfg.effnet_embd), f32),
            s((1, 4, cfg.clip_embd), f32),
        )
    if isinstance(module, PaellaVQModel):
        n = 2 * cfg.up_down_scale_factor * 2 ** (cfg.levels - 1)
        return (s((1, n, n, cfg.in_channels), f32),)
    if isinstance(module, CLIPTextModel):
        return s((1, 4), jnp.int32), s((1, 4), jnp.int32)
    if isinstance(module, EfficientNetEncoder):
        return (s((1, 32, 32, 3), f32),)
    raise TypeError(f"not a wurst_jax model: {type(module).__name__}")


def abstract_variables(module: nn.Module, boxed: bool = False) -> Any:
    """`jax.eval_shape` of `module.init`: the variables tree as ShapeDtypeStructs (logical axes kept if `boxed`)."""
    tree = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *example_inputs(module))
    return tree if boxed else nn.meta.unbox(tree)


def param_count(module: nn.Module) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_variables(module)["params"]))


__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "EfficientNetConfig",
    "EfficientNetEncoder",
    "PaellaVQModel",
    "StageAConfig",
    "StageBConfig",
    "StageCConfig",
    "WuerstchenDiffNeXt",
    "WuerstchenPrior",
    "abstract_variables",
    "example_inputs",
    "param_count",
]
