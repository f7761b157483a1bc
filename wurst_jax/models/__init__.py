"""Flax modules of both model generations and their shared encoders (NHWC, no file access), and the component
registry (`wurst_jax.models.registry`) that names them.

- `wuerstchen/`: Würstchen v2 — Stage A (`PaellaVQModel`), Stage B (`WuerstchenDiffNeXt`), Stage C
  (`WuerstchenPrior`).
- shared: the CLIP text encoder, the EfficientNet semantic encoder, the blocks (`layers.py`), repeated-block
  execution (`repeat.py`) and the antialiased resize (`resize.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from wurst_jax.models import registry
from wurst_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from wurst_jax.models.effnet import EfficientNetConfig, EfficientNetEncoder
from wurst_jax.models.wuerstchen import (
    PaellaVQModel,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
)


def example_inputs(module: nn.Module) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Smallest inputs that create every parameter of `module` (parameter shapes do not depend on them)."""
    return registry.for_module(module).example_inputs(module.config)


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
    "registry",
]
