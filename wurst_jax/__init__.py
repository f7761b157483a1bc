"""wurst_jax: Würstchen v2 text-to-image in JAX/Flax.

The public surface: the stage modules and their configs, `load_component` / `convert_state_dict` for
PyTorch weights, and `WeightsError`, the exception every weight problem raises.
"""

from wurst_jax.models import (
    CLIPTextConfig,
    CLIPTextModel,
    PaellaVQModel,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
)
from wurst_jax.weights import WeightsError, convert_state_dict, load_component

__version__ = "0.1.0"

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "PaellaVQModel",
    "StageAConfig",
    "StageBConfig",
    "StageCConfig",
    "WeightsError",
    "WuerstchenDiffNeXt",
    "WuerstchenPrior",
    "convert_state_dict",
    "load_component",
]
