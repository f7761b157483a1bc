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
from jax.sharding import Mesh

from wurst_jax import sampling
from wurst_jax import scheduler as sched
from wurst_jax.pipeline_io import Component, compiled, load_pipeline_folder, to_pil
from wurst_jax.prompts import has_weights, strip_weights, tokenize, tokenize_weighted
from wurst_jax.sharding import Placement


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

    def __init__(self, tokenizer: Any, encoder: Component, progress: Any, placement: Placement):
        self.tokenizer, self.encoder, self.progress, self.placement = tokenizer, encoder, progress, placement

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids, mask = tokenize(self.tokenizer, [strip_weights(p) for p in prompts])
        with self.encoder.on_device() as variables:
            states = self._encode(variables, ids, mask)
            if any(has_weights(p) for p in prompts):
                rows = [tokenize_weighted(self.tokenizer, p) for p in prompts]
                ids_w, mask_w, w = (np.stack(x) for x in zip(*rows, strict=True))
                empty = self._encode(variables, *tokenize(self.tokenizer, [""] * len(prompts)))
                states = empty + w[..., None] * (self._encode(variables, ids_w, mask_w) - empty)
        return states

    def _encode(self, variables, ids, mask) -> np.ndarray:
        fn = compiled("text_encoder", _encode_text, static=(0,), progress=self.progress)
        place = self.placement
        out = fn(self.encoder.module, variables, place.batch(ids), place.batch(mask))
        return place.host(out)[: len(ids)]


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
        mesh: Mesh | None = None,
    ):
        self.placement = Placement(mesh)
        self.text = _TextStage(tokenizer, text_encoder, progress, self.placement)
        self.prior, self.scheduler, self.progress = prior, scheduler, progress
        self.latent_mean, self.latent_std, self.resolution_multiple = latent_mean, latent_std, resolution_multiple

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: Any = jnp.float32,
        offload: bool = False,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        progress: bool = True,
        prefix: str = "",
    ) -> WuerstchenPriorPipeline:
        """A `warp-ai/wuerstchen-prior`-style folder (prior/, text_encoder/, tokenizer/, scheduler/); `prefix`
        names the parts inside a combined folder (`prior_`)."""
        parts = load_pipeline_folder(
            path, ("prior", "text_encoder", "tokenizer"), dtype, offload, prefix, mesh, sharding
        )
        keys = ("latent_mean", "latent_std", "resolution_multiple")
        cfg = {k: parts["config"][k] for k in keys if k in parts["config"]}
        return cls(
            parts["tokenizer"],
            parts["text_encoder"],
            parts["prior"],
            parts["scheduler"],
            progress=progress,
            mesh=mesh,
            **cfg,
        )

    def latent_size(self, height: Any, width: Any) -> tuple[int, int]:
        """Pixel size → Stage C grid, ceil(size / resolution_multiple) as diffusers."""
        h, w = _check_int("height", height), _check_int("width", width)
        return math.ceil(h / self.resolution_multiple), math.ceil(w / self.resolution_multiple)

    def encode_prompt(
        self, prompt, negative_prompt, num_images_per_prompt, use_cfg, prompt_embeds=None, negative_prompt_embeds=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Text states [N, T, D] per image, and the unconditional ones [N, T, D] when `use_cfg` (else None)."""
        if prompt_embeds is None:
            cond = self.text(_as_list("prompt", prompt))
        else:
            cond = Placement.host(prompt_embeds).astype(np.float32)
            if cond.ndim != 3:
                raise ValueError(f"`prompt_embeds` must be [batch, tokens, dim], got shape {cond.shape}")
        b = cond.shape[0]
        cond = np.repeat(cond, num_images_per_prompt, axis=0)
        if not use_cfg:
            return cond, None
        if negative_prompt_embeds is not None:
            uncond = Placement.host(negative_prompt_embeds).astype(np.float32)
            if uncond.shape != (b, *cond.shape[1:]):
                raise ValueError(f"`negative_prompt_embeds` shape {uncond.shape} must equal `prompt_embeds` shape")
        else:
            negatives = [""] * b if negative_prompt is None else _as_list("negative_prompt", negative_prompt)
            if len(negatives) == 1 and b > 1 and isinstance(negative_prompt, str):
                negatives = negatives * b
            if len(negatives) != b:
                raise ValueError(f"`negative_prompt` has {len(negatives)} entries but `prompt` has {b}")
            uncond = self.text(negatives)
        return cond, np.repeat(uncond, num_images_per_prompt, axis=0)

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
        cond, uncond = self.encode_prompt(prompt, negative_prompt, n_per, w > 1, prompt_embeds, negative_prompt_embeds)
        n = cond.shape[0]
        shape = (h, wd, self.prior.module.config.c_in)
        x, noise = _initial(seed, n, shape, len(ts) - 1, latents, step_noise, streams=(0, 1))
        detail = f"{len(ts) - 1} steps × {n} images{' + CFG' if w > 1 else ''}, latent {h}×{wd}"
        loop = compiled("prior", sampling.prior_loop, static=(0, 7, 8), progress=self.progress, detail=detail)
        place = self.placement
        with self.prior.on_device() as variables:
            out = loop(
                self.prior.module,
                variables,
                place.batch(x),
                place.replicated(ts),
                place.batch(noise, axis=1),
                _cfg_batch(place, cond, uncond),
                place.replicated(np.float32(w)),
                self.scheduler,
                w > 1,
            )
        emb = place.host(out)[:n] * self.latent_mean - self.latent_std
        return WuerstchenPriorPipelineOutput(emb if output_type == "np" else jnp.asarray(emb))


def _initial(seed, n, shape, steps, latents, noise, streams) -> tuple[np.ndarray, np.ndarray]:
    """Initial latents [N, *shape] and per-step noise [S, N, *shape]: given, or drawn from the per-image seeds."""
    keys = image_keys(seed, n) if latents is None or noise is None else None
    x = draw(keys, streams[0], shape) if latents is None else _given("latents", latents, (n, *shape))
    eps = (
        step_noise(keys, streams[1], steps, shape) if noise is None else _given("step_noise", noise, (steps, n, *shape))
    )
    return np.asarray(x), np.asarray(eps)


def _given(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = Placement.host(value).astype(np.float32)
    if arr.shape != shape:
        raise ValueError(f"`{name}` has shape {arr.shape}, expected {shape}")
    return arr


def _cfg_batch(place: Placement, cond: np.ndarray, uncond: np.ndarray | None) -> jax.Array:
    """[cond; uncond] with each half padded to the data axis, so row i of each half belongs to image i."""
    if uncond is None:
        return place.batch(cond)
    pad = lambda a: np.concatenate([a] + [a[-1:]] * (place.padded(len(a)) - len(a)))
    return place.batch(np.concatenate([pad(cond), pad(uncond)]))


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
        mesh: Mesh | None = None,
    ):
        self.placement = Placement(mesh)
        self.text = _TextStage(tokenizer, text_encoder, progress, self.placement)
        self.decoder, self.vqgan, self.scheduler = decoder, vqgan, scheduler
        self.latent_dim_scale, self.progress = latent_dim_scale, progress

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: Any = jnp.float32,
        offload: bool = False,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        progress: bool = True,
    ) -> WuerstchenDecoderPipeline:
        """A `warp-ai/wuerstchen`-style folder (decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/)."""
        parts = ("decoder", "vqgan", "text_encoder", "tokenizer")
        parts = load_pipeline_folder(path, parts, dtype, offload, "", mesh, sharding)
        cfg = {k: parts["config"][k] for k in ("latent_dim_scale",) if k in parts["config"]}
        return cls(
            parts["tokenizer"],
            parts["text_encoder"],
            parts["decoder"],
            parts["vqgan"],
            parts["scheduler"],
            progress=progress,
            mesh=mesh,
            **cfg,
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
        """`image_embeddings` [B, h, w, 16]; `prompt`: one for all, or one per embedding (or per group of them)."""
        emb = Placement.host(image_embeddings).astype(np.float32)
        c_eff = self.decoder.module.config.effnet_embd
        if emb.ndim != 4 or emb.shape[-1] != c_eff:
            raise ValueError(f"`image_embeddings` must be [B, h, w, {c_eff}], got shape {emb.shape}")
        n_per = _check_int("num_images_per_prompt", num_images_per_prompt)
        w = _check_guidance("guidance_scale", guidance_scale)
        ts = _schedule("num_inference_steps", num_inference_steps, timesteps)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'latent', got {output_type!r}")
        emb = np.repeat(emb, n_per, axis=0)
        n = emb.shape[0]
        h, wd = self.latent_size(emb.shape[1], emb.shape[2])
        cond = self.text(_per_image("prompt", prompt, n))
        uncond = None
        if w > 1:
            uncond = self.text(_per_image("negative_prompt", "" if negative_prompt is None else negative_prompt, n))
        shape = (h, wd, self.decoder.module.config.c_in)
        x, noise = _initial(seed, n, shape, len(ts) - 1, latents, step_noise, streams=(2, 3))
        detail = f"{len(ts) - 1} steps × {n} images{' + CFG' if w > 1 else ''}, latent {h}×{wd}"
        loop = compiled("decoder", sampling.decoder_loop, static=(0, 8, 9), progress=self.progress, detail=detail)
        place = self.placement
        with self.decoder.on_device() as variables:
            out = loop(
                self.decoder.module,
                variables,
                place.batch(x),
                place.replicated(ts),
                place.batch(noise, axis=1),
                place.batch(emb),
                _cfg_batch(place, cond, uncond),
                place.replicated(np.float32(w)),
                self.scheduler,
                w > 1,
            )
        if output_type == "latent":
            return ImagePipelineOutput(place.host(out)[:n])
        decode = compiled("vqgan", sampling.decode_images, static=(0,), progress=self.progress)
        with self.vqgan.on_device() as variables:
            images = place.host(decode(self.vqgan.module, variables, out))[:n]
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
        mesh: Mesh | None = None,
        sharding: str | None = None,
        progress: bool = True,
    ) -> WuerstchenPipeline:
        """`decoder`: a `warp-ai/wuerstchen`-style folder, or a combined folder (with `prior_prior/`, …);
        `prior`: a `warp-ai/wuerstchen-prior`-style folder. `offload` keeps inactive stages in host memory;
        `mesh` (`wurst_jax.make_mesh(...)`) with `sharding` "dp" (default), "fsdp" or "tp" shards every stage."""
        opts = dict(dtype=dtype, offload=offload, mesh=mesh, sharding=sharding, progress=progress)
        if prior is None:
            prior_pipe = WuerstchenPriorPipeline.from_pretrained(decoder, prefix="prior_", **opts)
        else:
            prior_pipe = WuerstchenPriorPipeline.from_pretrained(prior, **opts)
        return cls(prior_pipe, WuerstchenDecoderPipeline.from_pretrained(decoder, **opts))

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
