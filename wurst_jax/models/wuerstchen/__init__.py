"""Würstchen v2: Stage A (Paella VQGAN), Stage B (the diffusion decoder), Stage C (the text-conditional prior)."""

from wurst_jax.models.wuerstchen.stage_a import PaellaVQModel, StageAConfig
from wurst_jax.models.wuerstchen.stage_b import StageBConfig, WuerstchenDiffNeXt
from wurst_jax.models.wuerstchen.stage_c import StageCConfig, WuerstchenPrior

__all__ = ["PaellaVQModel", "StageAConfig", "StageBConfig", "StageCConfig", "WuerstchenDiffNeXt", "WuerstchenPrior"]
