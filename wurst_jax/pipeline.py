"""Text-to-image pipelines with diffusers' Würstchen arguments: prior, decoder, and the two combined.

`WuerstchenPipeline.from_pretrained(decoder=..., prior=...)` loads local folders in the diffusers layout
(`warp-ai/wuerstchen` + `warp-ai/wuerstchen-prior`, or one combined folder), or Hub ids when a network exists.
Each stage's whole denoising loop is one compiled function, cached per input shape; randomness comes from
`seed` (an int, or one int per image), so a call is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax import sampling
from wurst_jax import scheduler as sched
from wurst_jax.pipeline_io import Component, compiled, load_pipeline_folder, to_pil
from wurst_jax.prompts import has_weights, strip_weights, tokenize, tokenize_weighted


@dataclasses.dataclass
class ImagePipelineOutput:
    """`images`: a list of PIL images, an array [N, H, W, 3] in [0, 1] ("np"), or decoder latents ("latent")."""

    images: Any


@dataclasses.dataclass
class WuerstchenPriorPipelineOutput:
    """`image_embeddings`: Stage C output mapped for Stage B ([N, h, w, 16], NHWC)."""

    image_embeddings: Any


def _as_list(name: str, value: Any, allow_none: bool = False) -> list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {value!r}")


def _per_image(name: str, value: Any, n: int) -> list[str]:
    """One text per image: a single text is shared, k texts (k dividing n) each cover n / k consecutive images."""
    texts = _as_list(name, value)
    if n % len(texts):
        raise ValueError(f"`{name}` has {len(texts)} entries, which does not divide the {n} images")
    return [t for t in texts for _ in range(n // len(texts))]


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an integer ≥ {low}, got {value!r}")
    return int(value)


def _check_guidance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number ≥ 0, got {value!r}")
    return float(value)


def _schedule(name: str, steps: Any, timesteps: Any) -> np.ndarray:
    try:
        if timesteps is not None:
            return sched.timesteps(timesteps=list(timesteps))
        return sched.timesteps(num_inference_steps=_check_int(name, steps))
    except ValueError as e:
        raise ValueError(f"{e} (pipeline argument `{name}` / its timesteps)") from None


def image_keys(seed: int | list[int] | None, n: int) -> jax.Array:
    """One PRNG key per image: `seed` int → fold_in(key(seed), i); a list gives each image its own seed."""
    if seed is None:
        seed = int.from_bytes(np.random.default_rng().bytes(4), "little")
    if isinstance(seed, (list, tuple)):
        if len(seed) != n or not all(isinstance(s, (int, np.integer)) for s in seed):
            raise ValueError(f"`seed` as a list needs {n} integers (one per image), got {seed!r}")
        return jnp.stack([jax.random.key(int(s)) for s in seed])
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int or a list of ints, got {seed!r}")
    base = jax.random.key(int(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


def draw(keys: jax.Array, stream: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal [N, *shape], image i drawn from fold_in(keys[i], stream) (independent of the batch)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, jnp.float32))(keys)


def step_noise(keys: jax.Array, stream: int, steps: int, shape: tuple[int, ...]) -> jax.Array:
    """Per-step noise [S, N, *shape]."""
    return jnp.swapaxes(draw(keys, stream, (steps, *shape)), 0, 1)


DEFAULT_SCHEDULER = sched.SchedulerConfig()


def _encode_text(module, variables, ids, mask):
    return module.apply(variables, ids, mask)


class _TextStage:
    """A tokenizer and a CLIP text encoder: prompts → last_hidden_state [N, 77, D] (weighted if marked up)."""

    def __init__(self, tokenizer: Any, encoder: Component, progress: Any):
        self.tokenizer, self.encoder, self.progress = tokenizer, encoder, progress

    def __call__(self, prompts: list[str]) -> jax.Array:
        ids, mask = tokenize(self.tokenizer, [strip_weights(p) for p in prompts])
        with self.encoder.on_device() as variables:
            states = self._encode(variables, ids, mask)
            if any(has_weights(p) for p in prompts):
                rows = [tokenize_weighted(self.tokenizer, p) for p in prompts]
                ids_w, mask_w, w = (np.stack(x) for x in zip(*rows, strict=True))
                empty = self._encode(variables, *tokenize(self.tokenizer, [""] * len(prompts)))
                states = empty + w[..., None] * (self._encode(variables, ids_w, mask_w) - empty)
        return states

    def _encode(self, variables, ids, mask):
        fn = compiled("text_encoder", _encode_text, static=(0,), progress=self.progress)
        return fn(self.encoder.module, variables, jnp.asarray(ids), jnp.asarray(mask))


class WuerstchenPriorPipeline:
    """Text → Stage C latents mapped for the decoder (`image_embeddings`), as diffusers' WuerstchenPriorPipeline."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Component,
        prior: Component,
        scheduler: sched.SchedulerConfig = DEFAULT_SCHEDULER,
        latent_mean: float = 42.0,
        latent_std: float = 1.0,
        resolution_multiple: float = 42.67,
        progress: bool = True,
    ):
        self.text = _TextStage(tokenizer, text_encoder, progress)
        self.prior, self.scheduler, self.progress = prior, scheduler, progress
        self.latent_mean, self.latent_std, self.resolution_multiple = latent_mean, latent_std, resolution_multiple

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = jnp.float32, offload: bool = False, **kw):
        parts = load_pipeline_folder(path, ("prior", "text_encoder", "tokenizer"), dtype, offload)
        cfg = {
            k: parts["config"][k] for k in ("latent_mean", "latent_std", "resolution_multiple") if k in parts["config"]
        }
        return cls(parts["tokenizer"], parts["text_encoder"], parts["prior"], parts["scheduler"], **cfg, **kw)

    def latent_size(self, height: Any, width: Any) -> tuple[int, int]:
        """Pixel size → Stage C grid, ceil(size / resolution_multiple) as diffusers."""
        h, w = _check_int("height", height), _check_int("width", width)
        return math.ceil(h / self.resolution_multiple), math.ceil(w / self.resolution_multiple)

    def encode_prompt(
        self, prompt, negative_prompt, num_images_per_prompt, use_cfg, prompt_embeds=None, negative_prompt_embeds=None
    ) -> jax.Array:
        """Text states [N, T, D], followed by the unconditional ones [N, T, D] when `use_cfg`."""
        if prompt_embeds is None:
            prompts = _as_list("prompt", prompt)
            cond = self.text(prompts)
        else:
            cond = jnp.asarray(prompt_embeds)
            if cond.ndim != 3:
                raise ValueError(f"`prompt_embeds` must be [batch, tokens, dim], got shape {cond.shape}")
        b = cond.shape[0]
        cond = jnp.repeat(cond, num_images_per_prompt, axis=0)
        if not use_cfg:
            return cond
        if negative_prompt_embeds is not None:
            uncond = jnp.asarray(negative_prompt_embeds)
            if uncond.shape != (b, *cond.shape[1:]):
                raise ValueError(f"`negative_prompt_embeds` shape {uncond.shape} must equal `prompt_embeds` shape")
        else:
            negatives = [""] * b if negative_prompt is None else _as_list("negative_prompt", negative_prompt)
            if len(negatives) == 1 and b > 1 and isinstance(negative_prompt, str):
                negatives = negatives * b
            if len(negatives) != b:
                raise ValueError(f"`negative_prompt` has {len(negatives)} entries but `prompt` has {b}")
            uncond = self.text(negatives)
        return jnp.concatenate([cond, jnp.repeat(uncond, num_images_per_prompt, axis=0)])

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 60,
        timesteps: list[float] | None = None,
        guidance_scale: float = 8.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: Any = None,
        output_type: str = "np",
        step_noise: Any = None,
    ) -> WuerstchenPriorPipelineOutput:
        """`step_noise` [S, N, h, w, C] replaces the per-step noise drawn from `seed` (for exact replays)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        n_per = _check_int("num_images_per_prompt", num_images_per_prompt)
        w = _check_guidance("guidance_scale", guidance_scale)
        ts = _schedule("num_inference_steps", num_inference_steps, timesteps)
        h, wd = self.latent_size(height, width)
        if output_type not in ("np", "jax"):
            raise ValueError(f"`output_type` must be 'np' or 'jax', got {output_type!r}")
        clip = self.encode_prompt(prompt, negative_prompt, n_per, w > 1, prompt_embeds, negative_prompt_embeds)
        n = clip.shape[0] // (2 if w > 1 else 1)
        shape = (h, wd, self.prior.module.config.c_in)
        keys = image_keys(seed, n)
        x = draw(keys, 0, shape) if latents is None else _given("latents", latents, (n, *shape))
        noise = _given("step_noise", step_noise, (len(ts) - 1, n, *shape)) if step_noise is not None else None
        noise = step_noise_or(noise, keys, 1, len(ts) - 1, shape)
        loop = compiled(
            "prior",
            sampling.prior_loop,
            static=(0, 7, 8),
            progress=self.progress,
            detail=f"{len(ts) - 1} steps × {n} images{' + CFG' if w > 1 else ''}, latent {h}×{wd}",
        )
        with self.prior.on_device() as variables:
            out = loop(
                self.prior.module, variables, x, jnp.asarray(ts), noise, clip, jnp.float32(w), self.scheduler, w > 1
            )
        emb = out * self.latent_mean - self.latent_std
        return WuerstchenPriorPipelineOutput(np.asarray(emb) if output_type == "np" else emb)


def _given(name: str, value: Any, shape: tuple[int, ...]) -> jax.Array:
    arr = jnp.asarray(value, jnp.float32)
    if arr.shape != shape:
        raise ValueError(f"`{name}` has shape {arr.shape}, expected {shape}")
    return arr


def step_noise_or(noise: jax.Array | None, keys: jax.Array, stream: int, steps: int, shape: tuple[int, ...]):
    return noise if noise is not None else step_noise(keys, stream, steps, shape)


class WuerstchenDecoderPipeline:
    """image_embeddings (+ text) → images, as diffusers' WuerstchenDecoderPipeline (Stage B loop + Stage A)."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Component,
        decoder: Component,
        vqgan: Component,
        scheduler: sched.SchedulerConfig = DEFAULT_SCHEDULER,
        latent_dim_scale: float = 10.67,
        progress: bool = True,
    ):
        self.text = _TextStage(tokenizer, text_encoder, progress)
        self.decoder, self.vqgan, self.scheduler = decoder, vqgan, scheduler
        self.latent_dim_scale, self.progress = latent_dim_scale, progress

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Any = jnp.float32, offload: bool = False, **kw):
        parts = load_pipeline_folder(path, ("decoder", "vqgan", "text_encoder", "tokenizer"), dtype, offload)
        cfg = {k: parts["config"][k] for k in ("latent_dim_scale",) if k in parts["config"]}
        return cls(
            parts["tokenizer"], parts["text_encoder"], parts["decoder"], parts["vqgan"], parts["scheduler"], **cfg, **kw
        )

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """Stage C grid → Stage B grid: int(size · latent_dim_scale), which Stage B's U-Net must be able to halve."""
        size = (int(h * self.latent_dim_scale), int(w * self.latent_dim_scale))
        k = self.decoder.module.config.downscale
        if any(s < k or s % k for s in size):
            ok = [p for p in range(1, 200) if int(p * self.latent_dim_scale) % k == 0][:8]
            raise ValueError(
                f"a {h}×{w} prior latent gives a {size[0]}×{size[1]} decoder latent, which must be a positive multiple "
                f"of {k}; prior latent sizes that work: {ok}… (height/width = size × 42.67, e.g. 1024 → 24)"
            )
        return size

    def __call__(
        self,
        image_embeddings: Any,
        prompt: str | list[str] = "",
        num_inference_steps: int = 12,
        timesteps: list[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: Any = None,
        output_type: str = "pil",
        step_noise: Any = None,
    ) -> ImagePipelineOutput:
        """`image_embeddings` [B, h, w, 16]; `prompt`: one for all, or one per embedding."""
        emb = jnp.asarray(image_embeddings, jnp.float32)
        if emb.ndim != 4 or emb.shape[-1] != self.decoder.module.config.effnet_embd:
            raise ValueError(
                f"`image_embeddings` must be [B, h, w, {self.decoder.module.config.effnet_embd}], got shape {emb.shape}"
            )
        n_per = _check_int("num_images_per_prompt", num_images_per_prompt)
        w = _check_guidance("guidance_scale", guidance_scale)
        ts = _schedule("num_inference_steps", num_inference_steps, timesteps)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'latent', got {output_type!r}")
        emb = jnp.repeat(emb, n_per, axis=0)
        n = emb.shape[0]
        clip = self.text(_per_image("prompt", prompt, n))
        if w > 1:
            negatives = _per_image("negative_prompt", "" if negative_prompt is None else negative_prompt, n)
            clip = jnp.concatenate([clip, self.text(negatives)])
        h, wd = self.latent_size(emb.shape[1], emb.shape[2])
        shape = (h, wd, self.decoder.module.config.c_in)
        keys = image_keys(seed, n)
        x = draw(keys, 2, shape) if latents is None else _given("latents", latents, (n, *shape))
        noise = _given("step_noise", step_noise, (len(ts) - 1, n, *shape)) if step_noise is not None else None
        noise = step_noise_or(noise, keys, 3, len(ts) - 1, shape)
        loop = compiled(
            "decoder",
            sampling.decoder_loop,
            static=(0, 8, 9),
            progress=self.progress,
            detail=f"{len(ts) - 1} steps × {n} images{' + CFG' if w > 1 else ''}, latent {h}×{wd}",
        )
        with self.decoder.on_device() as variables:
            out = loop(
                self.decoder.module,
                variables,
                x,
                jnp.asarray(ts),
                noise,
                emb,
                clip,
                jnp.float32(w),
                self.scheduler,
                w > 1,
            )
        if output_type == "latent":
            return ImagePipelineOutput(out)
        decode = compiled("vqgan", sampling.decode_images, static=(0,), progress=self.progress)
        with self.vqgan.on_device() as variables:
            images = np.asarray(decode(self.vqgan.module, variables, out))
        return ImagePipelineOutput(to_pil(images) if output_type == "pil" else images)


class WuerstchenPipeline:
    """Text → images: the prior and the decoder pipelines in sequence (diffusers' WuerstchenCombinedPipeline)."""

    def __init__(self, prior_pipe: WuerstchenPriorPipeline, decoder_pipe: WuerstchenDecoderPipeline):
        self.prior_pipe, self.decoder_pipe = prior_pipe, decoder_pipe

    @classmethod
    def from_pretrained(
        cls,
        decoder: str | Path,
        prior: str | Path | None = None,
        dtype: Any = jnp.float32,
        offload: bool = False,
        progress: bool = True,
    ) -> WuerstchenPipeline:
        """`decoder`: a `warp-ai/wuerstchen`-style folder, or a combined folder (with `prior_prior/`);
        `prior`: a `warp-ai/wuerstchen-prior`-style folder. `offload` keeps inactive stages in host memory."""
        combined = prior is None
        prior_path = decoder if combined else prior
        prefix = "prior_" if combined else ""
        prior_parts = load_pipeline_folder(prior_path, ("prior", "text_encoder", "tokenizer"), dtype, offload, prefix)
        cfg = {
            k: prior_parts["config"][k]
            for k in ("latent_mean", "latent_std", "resolution_multiple")
            if k in prior_parts["config"]
        }
        prior_pipe = WuerstchenPriorPipeline(
            prior_parts["tokenizer"],
            prior_parts["text_encoder"],
            prior_parts["prior"],
            prior_parts["scheduler"],
            progress=progress,
            **cfg,
        )
        decoder_pipe = WuerstchenDecoderPipeline.from_pretrained(decoder, dtype, offload, progress=progress)
        return cls(prior_pipe, decoder_pipe)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        prior_num_inference_steps: int = 60,
        prior_timesteps: list[float] | None = None,
        prior_guidance_scale: float = 4.0,
        num_inference_steps: int = 12,
        decoder_timesteps: list[float] | None = None,
        decoder_guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: Any = None,
        output_type: str = "pil",
        decoder_latents: Any = None,
        prior_step_noise: Any = None,
        decoder_step_noise: Any = None,
    ) -> ImagePipelineOutput:
        """Arguments and defaults as diffusers' WuerstchenCombinedPipeline, with `seed` for generators.

        Images come out grouped by prompt: prompt 0's `num_images_per_prompt` images first. `latents` are the
        initial prior latents [N, h, w, 16]; `decoder_latents` [N, H, W, 4] and the `*_step_noise` arrays
        [S, N, ...] replace what `seed` would draw (for exact replays).
        """
        prompts = None if prompt is None else _as_list("prompt", prompt)
        n = (len(prompts) if prompts else np.shape(prompt_embeds)[0]) * _check_int(
            "num_images_per_prompt", num_images_per_prompt
        )
        self.decoder_pipe.latent_size(*self.prior_pipe.latent_size(height, width))  # fail before any work
        image_keys(seed, n)  # validate the seed before any work
        prior_seed = seed if seed is not None else int.from_bytes(np.random.default_rng().bytes(4), "little")
        emb = self.prior_pipe(
            prompt=prompts,
            height=height,
            width=width,
            num_inference_steps=prior_num_inference_steps,
            timesteps=prior_timesteps,
            guidance_scale=prior_guidance_scale,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
            seed=prior_seed,
            latents=latents,
            output_type="jax",
            step_noise=prior_step_noise,
        ).image_embeddings
        return self.decoder_pipe(
            emb,
            prompt=prompts or "",
            num_inference_steps=num_inference_steps,
            timesteps=decoder_timesteps,
            guidance_scale=decoder_guidance_scale,
            negative_prompt=negative_prompt,
            seed=prior_seed,
            latents=decoder_latents,
            output_type=output_type,
            step_noise=decoder_step_noise,
        )
