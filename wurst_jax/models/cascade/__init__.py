"""Stable Cascade (Würstchen v3): the UNet shared by stage C (prior) and stage B (decoder)."""

from wurst_jax.models.cascade.config import StableCascadeUNetConfig
from wurst_jax.models.cascade.unet import StableCascadeUNet, abstract_params, example_inputs, param_count

__all__ = ["StableCascadeUNet", "StableCascadeUNetConfig", "abstract_params", "example_inputs", "param_count"]
