"""Training a stage C ControlNet with stage C frozen, as the original's `train/train_c_controlnet.py`.

The objective (the original's GDF: cosine schedule, VP scaler, ε target, P2 loss weight, `CosineTNoiseCond`):
t = (1 - u) + 0.001 clamped to [0.001, 1], ᾱ = the cosine ᾱ(t) clamped to [1e-4, 0.9999], ε ~ N(0, 1) plus
`offset_noise` · N(0, 1) per sample and channel (0.1 in the released inpainting / sr configs, 0 for canny),
x_t = √ᾱ·x + √(1-ᾱ)·ε, stage C sees the noise ratio recovered from the clamped ᾱ and the ControlNet's control
of the condition image, and the loss is mean((pred - ε)²) per sample weighted by (1 + SNR)^-1 = 1 - ᾱ.
Each sample's text becomes the empty prompt's with probability `text_dropout` (0.05) when `empty_text` is given.
The original keeps stage C in PyTorch's training mode (its dropout active) although it is frozen: `stage_c_dropout`.

Parameters: one tree {"controlnet": ..., "stage_c": ...} (`controlnet_variables`) of which only "controlnet"
trains (`TRAINABLE`), so `build_train_setup` keeps stage C in the state's frozen half (no gradients, no
optimizer state, never updated). The ControlNet's BatchNorms use their running statistics, as the original trains
with `backbone.eval()`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.samplers import ddpm_wuerstchen as sched
from wurst_jax.train.objectives import sample_t

_SCHED = sched.DDPMWuerstchen()


def TRAINABLE(path: tuple[str, ...]) -> bool:  # noqa: N802  (a constant-like predicate for build_train_setup)
    """Only the ControlNet's parameters train."""
    return path[0] == "controlnet"


def controlnet_variables(stage_c_params: Any, controlnet_vars: dict) -> dict:
    """The training tree: {"params": {"controlnet", "stage_c"}, "batch_stats": {"controlnet"}} (batch_stats only
    when the ControlNet has BatchNorms, i.e. the effnet bottleneck)."""
    out = {"params": {"controlnet": controlnet_vars["params"], "stage_c": stage_c_params}}
    if controlnet_vars.get("batch_stats"):
        out["batch_stats"] = {"controlnet": controlnet_vars["batch_stats"]}
    return out


def noise_condition(alpha_cumprod: jax.Array, config: sched.DDPMWuerstchen = _SCHED) -> jax.Array:
    """The noise ratio whose cosine ᾱ is `alpha_cumprod` (the original's `CosineTNoiseCond`)."""
    s = jnp.float32(config.s)
    init = jnp.cos(s / (1 + s) * jnp.float32(np.pi) * 0.5) ** 2
    return jnp.arccos(jnp.sqrt(alpha_cumprod * init)) / jnp.float32(np.pi * 0.5) * (1 + s) - s


def controlnet_loss(
    unet: Any,
    controlnet: Any,
    offset_noise: float = 0.0,
    empty_text: tuple[jax.Array, jax.Array] | None = None,
    text_dropout: float = 0.05,
    stage_c_dropout: bool = True,
    config: sched.DDPMWuerstchen = _SCHED,
):
    """`loss(params, batch_stats, rng, batch) -> (loss, {})` for `build_train_setup` (see the module doc).

    `unet`: the stage C `StableCascadeUNet`; `controlnet`: the `StableCascadeControlNet`. Batches:
    {"latents" [B, h, w, 16] (stage C's target space), "condition" [B, H, W, c_in] (a filter's output),
    "clip_text" [B, T, Ct], "clip_text_pooled" [B, 1, Cp], optionally "clip_img" [B, n, Ci] (default zeros)}.
    `empty_text`: the empty prompt's (clip_text [1, T, Ct], clip_text_pooled [1, 1, Cp]) for text dropout."""

    def loss(params: Any, batch_stats: Any, rng: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
        r_t, r_n, r_o, r_text, r_drop = jax.random.split(rng, 5)
        x0 = batch["latents"].astype(jnp.float32)
        b = x0.shape[0]
        ac = sched.alpha_cumprod(sample_t(r_t, b, "b"), config)  # "b": (1 - u) + 0.001, GDF's t
        noise = jax.random.normal(r_n, x0.shape, jnp.float32)
        if offset_noise:
            noise = noise + offset_noise * jax.random.normal(r_o, (b, 1, 1, x0.shape[-1]), jnp.float32)
        a = ac[:, None, None, None]
        noised = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

        text, pooled = batch["clip_text"], batch["clip_text_pooled"]
        if empty_text is not None and text_dropout > 0:
            drop = jax.random.uniform(r_text, (b, 1, 1)) < text_dropout
            text = jnp.where(drop, jnp.broadcast_to(empty_text[0], text.shape).astype(text.dtype), text)
            pooled = jnp.where(drop, jnp.broadcast_to(empty_text[1], pooled.shape).astype(pooled.dtype), pooled)
        img = batch.get("clip_img")
        if img is None:
            img = jnp.zeros((b, 1, unet.config.clip_image_in_channels), jnp.float32)

        cn_vars = {"params": params["controlnet"]}
        if batch_stats:
            cn_vars["batch_stats"] = batch_stats["controlnet"]
        control = controlnet.apply(cn_vars, batch["condition"])
        pred = unet.apply(
            {"params": params["stage_c"]},
            noised,
            noise_condition(ac, config),
            pooled,
            text,
            img,
            deterministic=not stage_c_dropout,
            control=control,
            rngs={"dropout": r_drop},
        )
        per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), axis=(1, 2, 3))
        return jnp.mean(per_sample * (1 - ac)), {}  # P2 (k 1, γ 1): (1 + ᾱ / (1 - ᾱ))^-1

    return loss
