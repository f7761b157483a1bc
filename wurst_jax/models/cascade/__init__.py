"""Stable Cascade (Würstchen v3): the UNet shared by stage C (prior) and stage B (decoder), and stage C's
ControlNet."""

from wurst_jax.models.cascade.config import StableCascadeUNetConfig
from wurst_jax.models.cascade.controlnet import ControlNetConfig, StableCascadeControlNet, scale_control
from wurst_jax.models.cascade.unet import StableCascadeUNet, abstract_params, example_inputs, param_count

__all__ = [
    "ControlNetConfig",
    "StableCascadeControlNet",
    "StableCascadeUNet",
    "StableCascadeUNetConfig",
    "abstract_params",
    "example_inputs",
    "param_count",
    "scale_control",
]
