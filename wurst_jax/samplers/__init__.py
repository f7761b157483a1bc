"""Samplers and the one denoising loop all model families run (`denoise_loop`).

- `protocol.py`: what a sampler is (`timesteps`, `step`, `add_noise`; hashable).
- `ddpm_wuerstchen.py`: `DDPMWuerstchen`, equal to diffusers' `DDPMWuerstchenScheduler` (both generations).
- `loop.py`: `denoise_loop` (from pure noise, or from a noised `x_init` at t_start < 1) and `guided` (CFG).
"""

from wurst_jax.samplers.ddpm_wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, DDPMWuerstchen
from wurst_jax.samplers.loop import denoise_loop, guided
from wurst_jax.samplers.protocol import Sampler

SAMPLERS = {DDPMWuerstchen.class_name: DDPMWuerstchen}  # diffusers `_class_name` → sampler


def sampler_from_config(config: dict) -> Sampler:
    """A diffusers `scheduler_config.json` dict → its sampler (a ValueError naming an unknown `_class_name`)."""
    name = config.get("_class_name", DDPMWuerstchen.class_name)
    if name not in SAMPLERS:
        raise ValueError(f"scheduler {name!r} is not supported; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name].from_dict(config)


__all__ = [
    "DDPMWuerstchen",
    "DEFAULT_STAGE_C_TIMESTEPS",
    "SAMPLERS",
    "Sampler",
    "denoise_loop",
    "guided",
    "sampler_from_config",
]
