"""The denoising loop every diffusion stage runs: one `lax.fori_loop` of sampler steps, traced inside the stage's
one jit.

`denoise_loop(denoiser, conditioning, sampler, timesteps, noise, step_noise, x_init)` starts at `timesteps[0]`:
from pure noise (`x_init` None, text-to-image at t = 1), or from `x_init` noised to `timesteps[0]` with the
sampler's `add_noise` (image-to-image: t_start < 1 and the steps that remain). The per-step noise is an input
([S, B, ...], drawn by the caller from the seeds) so that a run is a deterministic function of its inputs and can
be replayed against another implementation. `guided` turns a model into a classifier-free-guided denoiser: the
conditional and unconditional halves run as one batch and mix as `lerp(uncond, cond, w)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wurst_jax.samplers.protocol import Sampler

# denoiser(x [B, ...] f32, r [B] f32, conditioning) -> the model's output (ε) [B, ...]
Denoiser = Callable[[jax.Array, jax.Array, Any], jax.Array]


def guided(model: Denoiser, guidance: jax.Array) -> Denoiser:
    """Classifier-free guidance over `model`: the conditioning holds the conditional rows first, then the
    unconditional ones ([2B, ...] per leaf); x and r are doubled to match."""

    def denoiser(x: jax.Array, r: jax.Array, conditioning: Any) -> jax.Array:
        out = model(jnp.concatenate([x, x]), jnp.concatenate([r, r]), conditioning)
        cond, uncond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        return uncond + guidance * (cond - uncond)

    return denoiser


def denoise_loop(
    denoiser: Denoiser,
    conditioning: Any,
    sampler: Sampler,
    timesteps: jax.Array,
    noise: jax.Array,
    step_noise: jax.Array,
    x_init: jax.Array | None = None,
) -> jax.Array:
    """Run the `S` steps of `timesteps` [S + 1] (descending; `timesteps[0]` is t_start) and return the final
    latents (f32). `noise` [B, ...] is the start (with `x_init`: the noise it is diffused with); `step_noise`
    [S, B, ...] the sampler's per-step noise."""
    x = noise.astype(jnp.float32)
    if x_init is not None:
        x = sampler.add_noise(x_init.astype(jnp.float32), x, jnp.full((x.shape[0],), timesteps[0], jnp.float32))

    def body(i, x):
        r = jnp.full((x.shape[0],), timesteps[i], jnp.float32)
        out = denoiser(x, r, conditioning).astype(jnp.float32)
        return sampler.step(out, r, jnp.full_like(r, timesteps[i + 1]), x, step_noise[i])

    return jax.lax.fori_loop(0, step_noise.shape[0], body, x)
