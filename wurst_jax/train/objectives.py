"""The Würstchen training objectives, as the original training scripts define them.

Stage C and Stage B: ε-prediction MSE on noised latents x_t = √ᾱ·x + √(1-ᾱ)·ε (the DDPM-Würstchen cosine
schedule), the per-sample loss weighted by the P2 weight (k + ᾱ/(1-ᾱ))^-γ and the noise ratio t sampled as
`(1 - u)·1.08 + 0.001` clamped to [0.001, 1] (Stage C) or `(1 - u) + 0.001` (Stage B).
Stage B's conditioning is dropped (zero effnet / empty-prompt text states) with probability `cond_dropout` so
the decoder learns the unconditional half that classifier-free guidance needs.
Stage A: reconstruction MSE plus the VQ codebook and commitment losses (β = 0.25 on the commitment term, as
diffusers' `VectorQuantizer(legacy=False)`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from wurst_jax.samplers import ddpm_wuerstchen as sched

_SCHED = sched.DDPMWuerstchen()


def p2_weight(t: jax.Array, config: sched.DDPMWuerstchen, k: float = 1.0, gamma: float = 1.0) -> jax.Array:
    """Perception-prioritised weight (k + SNR(t))^-γ, SNR = ᾱ / (1 - ᾱ)."""
    ac = sched.alpha_cumprod(t, config)
    return (k + ac / (1 - ac)) ** -gamma


def sample_t(rng: jax.Array, n: int, stage: str) -> jax.Array:
    """Noise ratios [n]: Stage C stretches the range by 1.08 (more samples at t = 1), as the original."""
    u = jax.random.uniform(rng, (n,))
    t = (1 - u) * 1.08 + 0.001 if stage == "c" else (1 - u) + 0.001
    return jnp.clip(t, 0.001, 1.0)


def v_weight(t: jax.Array, config: sched.DDPMWuerstchen, cap: float = 20.0) -> jax.Array:
    """1 / ᾱ, capped: ε-MSE · (1 + 1/SNR) is the MSE of v = √ᾱ·ε - √(1-ᾱ)·x. Unlike the P2 weight it keeps the
    high-noise steps, where a small prior decides an image's layout, from counting for almost nothing."""
    return 1.0 / jnp.maximum(sched.alpha_cumprod(t, config), 1.0 / cap)


WEIGHTINGS = {"p2": p2_weight, "v": v_weight}


def _diffusion_loss(pred, noise, t, config: sched.DDPMWuerstchen, weighting: str = "p2") -> jax.Array:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}, got {weighting!r}")
    per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), axis=tuple(range(1, noise.ndim)))
    return jnp.mean(per_sample * WEIGHTINGS[weighting](t, config))


def drop_text(rng: jax.Array, clip: jax.Array, empty_clip: jax.Array, p: float) -> jax.Array:
    """Classifier-free-guidance dropout for Stage C: each sample's text states [B, T, D] become the empty
    prompt's [1, T, D] with probability `p`."""
    keep = jax.random.uniform(rng, (clip.shape[0], 1, 1)) >= p
    return jnp.where(keep, clip, jnp.broadcast_to(empty_clip, clip.shape).astype(clip.dtype))


def stage_c_loss(module, params, rng, latents, clip, config=_SCHED, train=True, weighting="p2") -> jax.Array:
    """latents [B, h, w, 16] (the prior's target space), clip [B, T, D] text states → weighted ε-MSE
    (`weighting` "p2", the original's, or "v": see `v_weight`)."""
    r_t, r_n, r_d = jax.random.split(rng, 3)
    t = sample_t(r_t, latents.shape[0], "c")
    noise = jax.random.normal(r_n, latents.shape, jnp.float32)
    noised = sched.add_noise(latents.astype(jnp.float32), noise, t, config)
    pred = module.apply({"params": params}, noised, t, clip, deterministic=not train, rngs={"dropout": r_d})
    return _diffusion_loss(pred, noise, t, config, weighting)


def cascade_c_loss(
    module, params, rng, latents, text, pooled, empty, cond_dropout=0.1, config=_SCHED, train=True, weighting="p2"
) -> jax.Array:
    """Stable Cascade's stage C with stage_c_loss's objective: latents [B, h, w, C], text [B, T, D] (the text
    encoder's last layer before its final norm), pooled [B, 1, P]; a dropped sample gets the empty prompt's `empty`
    {"text", "pooled"}, and every sample the zero image token the pipeline uses without images."""
    r_t, r_n, r_c, r_d = jax.random.split(rng, 4)
    b = latents.shape[0]
    keep = (jax.random.uniform(r_c, (b,)) >= cond_dropout)[:, None, None]
    text = jnp.where(keep, text, jnp.broadcast_to(empty["text"], text.shape).astype(text.dtype))
    pooled = jnp.where(keep, pooled, jnp.broadcast_to(empty["pooled"], pooled.shape).astype(pooled.dtype))
    image = jnp.zeros((b, 1, module.config.clip_image_in_channels), jnp.float32)
    t = sample_t(r_t, b, "c")
    noise = jax.random.normal(r_n, latents.shape, jnp.float32)
    noised = sched.add_noise(latents.astype(jnp.float32), noise, t, config)
    pred = module.apply(
        {"params": params}, noised, t, pooled, text, image, deterministic=not train, rngs={"dropout": r_d}
    )
    return _diffusion_loss(pred, noise, t, config, weighting)


def stage_b_loss(
    module, params, rng, latents, effnet, clip, empty_clip, cond_dropout=0.1, config=_SCHED, train=True
) -> jax.Array:
    """latents [B, H, W, 4] (Stage A latents / scale_factor), effnet [B, h, w, 16], clip [B, T, D];
    `empty_clip` [1, T, D] replaces the text states of dropped samples."""
    r_t, r_n, r_c, r_d = jax.random.split(rng, 4)
    b = latents.shape[0]
    t = sample_t(r_t, b, "b")
    noise = jax.random.normal(r_n, latents.shape, jnp.float32)
    noised = sched.add_noise(latents.astype(jnp.float32), noise, t, config)
    keep = (jax.random.uniform(r_c, (b,)) >= cond_dropout)[:, None, None, None]
    effnet = jnp.where(keep, effnet, 0.0)
    clip = jnp.where(keep[:, :, :, 0], clip, jnp.broadcast_to(empty_clip, clip.shape))
    pred = module.apply({"params": params}, noised, t, effnet, clip, deterministic=not train, rngs={"dropout": r_d})
    return _diffusion_loss(pred, noise, t, config)


def stage_a_loss(module, variables: Any, images: jax.Array, beta: float = 0.25) -> tuple[jax.Array, dict]:
    """images [B, H, W, 3] in [0, 1] → reconstruction + codebook + β·commitment; BatchNorm runs on batch
    statistics in training and returns the updated running statistics."""
    z, updates = module.apply(variables, images, True, method="encode", mutable=["batch_stats"])
    z_st, idx = module.apply(variables, z, method="quantize")  # straight-through: gradients reach the encoder
    recon = module.apply(variables, z_st, method="decode")
    rec = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
    entries = variables["params"]["vquantizer"]["embedding"]["embedding"][idx].astype(jnp.float32)
    codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - entries))
    commit = jnp.mean(jnp.square(z - jax.lax.stop_gradient(entries)))
    return rec + codebook + beta * commit, {"rec": rec, "codebook": codebook, "batch_stats": updates["batch_stats"]}


def component_loss(stage: str, module, empty_clip=None, cond_dropout: float = 0.1, weighting: str = "p2"):
    """The loss of one trained component as `loss(params, batch_stats, rng, batch) -> (loss, aux)` (the train
    step's `loss_fn`), on batches the frozen encoders already made:
    - "c" (the prior): {"latents" [B, h, w, 16], "clip" [B, T, D]}; each sample's text states become `empty_clip`
      [1, T, D] (the empty prompt's) with probability `cond_dropout`; `weighting` as `stage_c_loss`. Stable
      Cascade's prior: {"latents", "text", "pooled"} and `empty_clip` {"text", "pooled"} (`cascade_c_loss`).
    - "b" (the decoder): {"latents" [B, H, W, 4], "effnet" [B, h, w, 16], "clip" [B, T, D]}; conditioning dropped
      with probability `cond_dropout` (`stage_b_loss`).
    - "a" (the VQGAN): {"images" [B, H, W, 3]}; aux carries the new `batch_stats`."""
    if stage == "a":
        return lambda params, stats, rng, batch: stage_a_loss(
            module, {"params": params, "batch_stats": stats}, batch["images"]
        )
    if stage not in ("b", "c"):
        raise ValueError(f"stage must be 'a', 'b' or 'c', got {stage!r}")
    if empty_clip is None:
        raise ValueError(f"the stage {stage} loss needs the empty prompt's text states (empty_clip)")
    if isinstance(empty_clip, dict):  # Stable Cascade's prior: {"text", "pooled"} of the empty prompt
        if stage != "c":
            raise ValueError(f"Stable Cascade fine-tuning trains stage c (the prior), not stage {stage}")

        def loss(params, stats, rng, batch):
            args = (batch["latents"], batch["text"], batch["pooled"], empty_clip, cond_dropout)
            return cascade_c_loss(module, params, rng, *args, weighting=weighting), {}

        return loss
    if stage == "b":

        def loss(params, stats, rng, batch):
            args = (batch["latents"], batch["effnet"], batch["clip"], empty_clip, cond_dropout)
            return stage_b_loss(module, params, rng, *args), {}

        return loss

    def loss(params, stats, rng, batch):
        r_drop, rng = jax.random.split(rng)
        clip = drop_text(r_drop, batch["clip"], empty_clip, cond_dropout)
        return stage_c_loss(module, params, rng, batch["latents"], clip, weighting=weighting), {}

    return loss
