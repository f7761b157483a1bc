"""The two denoising loops (Stage C prior, Stage B decoder), each one `lax.fori_loop` inside one jit.

Pure functions of (module, variables, initial latents, timesteps, per-step noise, conditioning): the pipeline
compiles them once per shape. The per-step noise is an input ([S, B, h, w, C], drawn by the caller from the
seeds) so that a run is a deterministic function of its inputs and can be replayed against another
implementation. Classifier-free guidance runs the conditional and unconditional halves as one batch and mixes
them as `lerp(uncond, cond, w)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax import scheduler as sched


def _cfg_mix(out: jax.Array, guidance: jax.Array) -> jax.Array:
    cond, uncond = jnp.split(out.astype(jnp.float32), 2, axis=0)
    return uncond + guidance * (cond - uncond)


def prior_loop(
    module: nn.Module,
    variables: Any,
    latents: jax.Array,
    timesteps: jax.Array,
    step_noise: jax.Array,
    clip: jax.Array,
    guidance: jax.Array,
    config: sched.SchedulerConfig,
    use_cfg: bool,
) -> jax.Array:
    """Stage C sampling. latents [B, h, w, 16]; timesteps [S + 1]; step_noise [S, B, h, w, 16];
    clip [2B, T, D] (cond rows first, then uncond) with CFG, else [B, T, D]. Returns the final latents (f32)."""

    def body(i, x):
        r = jnp.full((x.shape[0],), timesteps[i], jnp.float32)
        if use_cfg:
            out = _cfg_mix(module.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([r, r]), clip), guidance)
        else:
            out = module.apply(variables, x, r, clip).astype(jnp.float32)
        return sched.step(out, r, jnp.full_like(r, timesteps[i + 1]), x, step_noise[i], config)

    return jax.lax.fori_loop(0, step_noise.shape[0], body, latents.astype(jnp.float32))


def decoder_loop(
    module: nn.Module,
    variables: Any,
    latents: jax.Array,
    timesteps: jax.Array,
    step_noise: jax.Array,
    effnet: jax.Array,
    clip: jax.Array,
    guidance: jax.Array,
    config: sched.SchedulerConfig,
    use_cfg: bool,
) -> jax.Array:
    """Stage B sampling. latents [B, H, W, 4]; effnet [B, h, w, 16]; clip [2B or B, T, D] as in `prior_loop`;
    with CFG the unconditional half sees a zero effnet. Returns the final latents (f32)."""
    if use_cfg:
        effnet = jnp.concatenate([effnet, jnp.zeros_like(effnet)])

    def body(i, x):
        r = jnp.full((x.shape[0],), timesteps[i], jnp.float32)
        if use_cfg:
            out = module.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([r, r]), effnet, clip)
            out = _cfg_mix(out, guidance)
        else:
            out = module.apply(variables, x, r, effnet, clip).astype(jnp.float32)
        return sched.step(out, r, jnp.full_like(r, timesteps[i + 1]), x, step_noise[i], config)

    return jax.lax.fori_loop(0, step_noise.shape[0], body, latents.astype(jnp.float32))


def decode_images(module: nn.Module, variables: Any, latents: jax.Array) -> jax.Array:
    """Stage A: decoder latents [B, H, W, 4] → images [B, 4H, 4W, 3] in [0, 1] (f32)."""
    scaled = latents * module.config.scale_factor
    images = module.apply(variables, scaled, method="decode")
    return jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
