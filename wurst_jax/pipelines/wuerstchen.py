"""Würstchen v2 text-to-image pipelines with diffusers' arguments: prior, decoder, and the two combined.

`WuerstchenPipeline.from_pretrained(decoder=..., prior=...)` loads local folders in the diffusers layout
(`warp-ai/wuerstchen` + `warp-ai/wuerstchen-prior`, or one combined folder), or Hub ids when a network exists.
Each stage's whole denoising loop is one compiled function (`runner.py`), cached per input shape; randomness
comes from `seed` (an int, or one int per image), so a call is reproducible. The prior's output stays on the
device when the combined pipeline hands it to the decoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from wurst_jax.lora.pipeline import LoraMixin
from wurst_jax.pipelines import args, image_to_image, random
from wurst_jax.pipelines.components import Component, load_pipeline_folder
from wurst_jax.pipelines.outputs import ImagePipelineOutput, WuerstchenPriorPipelineOutput, to_pil
from wurst_jax.pipelines.runner import StageRunner, decode_images, setup_plan
from wurst_jax.pipelines.runtime import CompileCache, default_compilation_cache
from wurst_jax.pipelines.text import TextEncoder
from wurst_jax.samplers import DDPMWuerstchen, Sampler
from wurst_jax.sharding import ShardingPlan

DEFAULT_SAMPLER = DDPMWuerstchen()


def prior_model(module, variables, x, r, cond):
    """Stage C: x [B, h, w, 16], r [B], cond {"clip": [B, 77, 1280]}."""
    return module.apply(variables, x, r, cond["clip"])


def decoder_model(module, variables, x, r, cond):
    """Stage B: x [B, H, W, 4], r [B], cond {"effnet": [B, h, w, 16], "clip": [B, 77, 1024]}."""
    return module.apply(variables, x, r, cond["effnet"], cond["clip"])


class WuerstchenPriorPipeline(LoraMixin):
    """Text → Stage C latents mapped for the decoder (`image_embeddings`), as diffusers' WuerstchenPriorPipeline."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Component,
        prior: Component,
        scheduler: Sampler = DEFAULT_SAMPLER,
        latent_mean: float = 42.0,
        latent_std: float = 1.0,
        resolution_multiple: float = 42.67,
        progress: bool = True,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        compiler: CompileCache | None = None,
    ):
        self.plan, self.compiler = setup_plan(mesh, sharding, progress, compiler)
        self.text = TextEncoder(tokenizer, text_encoder, self.plan, self.compiler)
        self.prior, self.scheduler, self.progress = prior, scheduler, progress
        self.runner = StageRunner(
            "prior",
            prior,
            prior_model,
            scheduler,
            self.plan,
            self.compiler,
            (random.Stream.PRIOR_LATENTS, random.Stream.PRIOR_STEPS),
        )
        self.latent_mean, self.latent_std, self.resolution_multiple = latent_mean, latent_std, resolution_multiple
        self.runner.adapters = lambda: self._lora()["prior"].loop_adapters()
        self.effnet: Component | None = None  # the EfficientNet encoder, for image-to-image (`load_effnet`)

    def load_effnet(self, path: Any, dtype: Any = jnp.float32) -> None:
        """The semantic encoder image-to-image encodes with: `model_v2_stage_b.pt` itself (its `effnet_state_dict`),
        a folder `load_component` reads (e.g. converted from it with `wurst-jax convert ... --stage effnet`), or
        (module, variables)."""
        self.effnet = image_to_image.load_effnet(path, dtype)

    def _lora_components(self) -> dict:
        """LoRA file prefixes (diffusers' `_lora_loadable_modules`) → (component, applied inside the loop)."""
        return {"prior": (self.prior, True), "text_encoder": (self.text.encoder, False)}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: Any = jnp.float32,
        offload: bool = False,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        progress: bool = True,
        variant: str | None = None,
        prefix: str = "",
        compiler: CompileCache | None = None,
    ) -> WuerstchenPriorPipeline:
        """A `warp-ai/wuerstchen-prior`-style folder (prior/, text_encoder/, tokenizer/, scheduler/); `prefix`
        names the parts inside a combined folder (`prior_`); `variant` ("bf16") reads diffusers' variant weight
        files."""
        default_compilation_cache()  # the per-user persistent cache unless the caller chose (runtime.py)
        plan = ShardingPlan(mesh, sharding or "dp")
        parts = load_pipeline_folder(
            path, ("prior", "text_encoder", "tokenizer"), dtype, offload, prefix, plan, variant=variant
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
            sharding=sharding,
            compiler=compiler,
            **cfg,
        )

    def latent_size(self, height: Any, width: Any) -> tuple[int, int]:
        """Pixel size → Stage C grid, ceil(size / resolution_multiple) as diffusers."""
        h, w = args.check_int("height", height), args.check_int("width", width)
        return math.ceil(h / self.resolution_multiple), math.ceil(w / self.resolution_multiple)

    def encode_prompt(
        self, prompt, negative_prompt, num_images_per_prompt, use_cfg, prompt_embeds=None, negative_prompt_embeds=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Text states [N, T, D] per image, and the unconditional ones [N, T, D] when `use_cfg` (else None)."""
        if prompt_embeds is None:
            cond = self.text(args.as_list("prompt", prompt))
        else:
            cond = ShardingPlan.host(prompt_embeds).astype(np.float32)
            if cond.ndim != 3:
                raise ValueError(f"`prompt_embeds` must be [batch, tokens, dim], got shape {cond.shape}")
        b = cond.shape[0]
        cond = np.repeat(cond, num_images_per_prompt, axis=0)
        if not use_cfg:
            return cond, None
        if negative_prompt_embeds is not None:
            uncond = ShardingPlan.host(negative_prompt_embeds).astype(np.float32)
            if uncond.shape != (b, *cond.shape[1:]):
                raise ValueError(f"`negative_prompt_embeds` shape {uncond.shape} must equal `prompt_embeds` shape")
        else:
            uncond = self.text(args.negatives(negative_prompt, b))
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
        image: Any = None,
        strength: float = 1.0,
    ) -> WuerstchenPriorPipelineOutput:
        """`step_noise` [S, N, h, w, C] replaces the per-step noise drawn from `seed` (for exact replays).
        `output_type` "np" (host), "jax" (a device array). Image-to-image: `image` (PIL, array [H, W, 3] or
        [B, H, W, 3], or a list; one for all prompts, or one per prompt/image) is encoded by `self.effnet`
        (`load_effnet`), noised to t = `strength` and denoised over the remaining steps (`image_to_image.py`)."""
        emb, n = self._embeddings(
            prompt, height, width, num_inference_steps, timesteps, guidance_scale, negative_prompt, prompt_embeds,
            negative_prompt_embeds, num_images_per_prompt, seed, latents, step_noise,
            args.check_output_type(output_type, ("np", "jax")), image, strength,
        )  # fmt: skip
        if output_type == "np":
            return WuerstchenPriorPipelineOutput(self.plan.host(emb)[:n])
        on_device = jax.device_put(self.plan.host(emb)[:n])
        return WuerstchenPriorPipelineOutput(on_device)

    def _embeddings(
        self, prompt, height, width, num_inference_steps, timesteps, guidance_scale, negative_prompt, prompt_embeds,
        negative_prompt_embeds, num_images_per_prompt, seed, latents, step_noise, output_type="np", image=None,
        strength=1.0,
    ) -> tuple[jax.Array, int]:  # fmt: skip
        """(image_embeddings [padded N, h, w, C] on the device, N)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        n_per = args.check_int("num_images_per_prompt", num_images_per_prompt)
        w = args.check_guidance("guidance_scale", guidance_scale)
        strength = image_to_image.check_strength(strength, image)
        if image is not None and strength < 1.0:
            ts = image_to_image.schedule(self.scheduler, num_inference_steps, timesteps, strength)
        else:  # strength 1: the image is noise only, exactly text-to-image
            ts = args.schedule(self.scheduler, "num_inference_steps", num_inference_steps, timesteps)
        h, wd = self.latent_size(height, width)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, n_per, w > 1, prompt_embeds, negative_prompt_embeds)
        x_init = None
        if image is not None and strength < 1.0:
            emb = image_to_image.encode_images(self, image, (h, wd), self.prior.module.config.c_in)
            cond, uncond, x_init = image_to_image.pair(cond, uncond, emb, n_per)
            x_init = (x_init + self.latent_std) / self.latent_mean  # the prior's space (its output maps back)
        n = cond.shape[0]
        out = self.runner(
            n,
            (h, wd, self.prior.module.config.c_in),
            ts,
            {"clip": cond},
            None if uncond is None else {"clip": uncond},
            w,
            seed,
            latents,
            step_noise,
            x_init,
        )
        if self.plan.mesh is None:  # on the host: the same numbers without two small compiled programs
            return np.asarray(out) * np.float32(self.latent_mean) - np.float32(self.latent_std), n
        return out * self.latent_mean - self.latent_std, n


class WuerstchenDecoderPipeline:
    """image_embeddings (+ text) → images, as diffusers' WuerstchenDecoderPipeline (Stage B loop + Stage A)."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Component,
        decoder: Component,
        vqgan: Component,
        scheduler: Sampler = DEFAULT_SAMPLER,
        latent_dim_scale: float = 10.67,
        progress: bool = True,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        compiler: CompileCache | None = None,
    ):
        self.plan, self.compiler = setup_plan(mesh, sharding, progress, compiler)
        self.text = TextEncoder(tokenizer, text_encoder, self.plan, self.compiler)
        self.decoder, self.vqgan, self.scheduler = decoder, vqgan, scheduler
        self.latent_dim_scale, self.progress = latent_dim_scale, progress
        self.runner = StageRunner(
            "decoder",
            decoder,
            decoder_model,
            scheduler,
            self.plan,
            self.compiler,
            (random.Stream.DECODER_LATENTS, random.Stream.DECODER_STEPS),
        )
        self.effnet: Component | None = None  # the EfficientNet encoder, for image variation (`load_effnet`)
        a = vqgan.module.config
        # pixels per prior-grid cell (v2: 10.67 × 4 ≈ 42.67): the grid an `image=` call encodes for its size
        self.resolution_multiple = latent_dim_scale * a.up_down_scale_factor**a.levels

    def load_effnet(self, path: Any, dtype: Any = jnp.float32) -> None:
        """The semantic encoder image variation (`image=`) encodes with: a folder, an original file or (module,
        variables), as the prior pipeline's `load_effnet`."""
        self.effnet = image_to_image.load_effnet(path, dtype)

    def embed_images(self, image: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
        """Image variation's `image_embeddings` [B, h, w, C]: the EfficientNet latents of `image` for a
        `height` × `width` output (default: the image's own size), grid ceil(size / `resolution_multiple`)."""
        shape = image_to_image.as_images(image).shape
        height = shape[1] if height is None else args.check_int("height", height)
        width = shape[2] if width is None else args.check_int("width", width)
        grid = (math.ceil(height / self.resolution_multiple), math.ceil(width / self.resolution_multiple))
        self.latent_size(*grid)  # a size the decoder can make, before any work
        return image_to_image.encode_images(self, image, grid, self.decoder.module.config.effnet_embd)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: Any = jnp.float32,
        offload: bool = False,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        progress: bool = True,
        variant: str | None = None,
        compiler: CompileCache | None = None,
    ) -> WuerstchenDecoderPipeline:
        """A `warp-ai/wuerstchen`-style folder (decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/);
        `variant` ("bf16") reads diffusers' variant weight files."""
        default_compilation_cache()  # the per-user persistent cache unless the caller chose (runtime.py)
        plan = ShardingPlan(mesh, sharding or "dp")
        names = ("decoder", "vqgan", "text_encoder", "tokenizer")
        parts = load_pipeline_folder(path, names, dtype, offload, "", plan, variant=variant)
        cfg = {k: parts["config"][k] for k in ("latent_dim_scale",) if k in parts["config"]}
        return cls(
            parts["tokenizer"],
            parts["text_encoder"],
            parts["decoder"],
            parts["vqgan"],
            parts["scheduler"],
            progress=progress,
            mesh=mesh,
            sharding=sharding,
            compiler=compiler,
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
        image_embeddings: Any = None,
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
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
    ) -> ImagePipelineOutput:
        """`image_embeddings` [B, h, w, 16]; `prompt`: one for all, or one per embedding (or per group of them).
        Image variation: `image` (PIL, array [H, W, 3] or [B, H, W, 3], or a list) in place of `image_embeddings`,
        encoded by `self.effnet` (`load_effnet`, see `embed_images`) for a `height` × `width` output (default: the
        image's size); no prior runs."""
        if (image_embeddings is None) == (image is None):
            raise ValueError("pass exactly one of `image_embeddings` and `image` (image variation)")
        if image is None and (height is not None or width is not None):
            raise ValueError("`height` / `width` go with `image=`; `image_embeddings` decide the size themselves")
        emb = image_embeddings if image is None else self.embed_images(image, height, width)
        if not isinstance(emb, jax.Array):
            emb = np.asarray(emb, np.float32)
        return self._decode(emb, int(np.shape(emb)[0]), prompt, num_inference_steps, timesteps, guidance_scale,
                            negative_prompt, num_images_per_prompt, seed, latents, output_type, step_noise)  # fmt: skip

    def _decode(
        self, emb, b, prompt, num_inference_steps, timesteps, guidance_scale, negative_prompt, num_images_per_prompt,
        seed, latents, output_type, step_noise,
    ) -> ImagePipelineOutput:  # fmt: skip
        """`emb`: [B or padded B, h, w, C] (host or device); its first `b` rows are the real ones."""
        c_eff = self.decoder.module.config.effnet_embd
        if len(np.shape(emb)) != 4 or np.shape(emb)[-1] != c_eff:
            raise ValueError(f"`image_embeddings` must be [B, h, w, {c_eff}], got shape {np.shape(emb)}")
        n_per = args.check_int("num_images_per_prompt", num_images_per_prompt)
        w = args.check_guidance("guidance_scale", guidance_scale)
        ts = args.schedule(self.scheduler, "num_inference_steps", num_inference_steps, timesteps)
        args.check_output_type(output_type, ("pil", "np", "latent"))
        n = b * n_per
        if not (isinstance(emb, jax.Array) and n_per == 1 and emb.shape[0] == self.plan.padded(b)):
            emb = np.repeat(self.plan.host(emb)[:b], n_per, axis=0)
        else:  # the prior's (padded) output: it stays where it is
            emb = emb.astype(jnp.float32)
        h, wd = self.latent_size(emb.shape[1], emb.shape[2])
        cond = {"effnet": emb, "clip": self.text(args.per_image("prompt", prompt, n))}
        uncond = None
        if w > 1:
            negatives = args.per_image("negative_prompt", "" if negative_prompt is None else negative_prompt, n)
            uncond = {"effnet": np.zeros(emb.shape, np.float32), "clip": self.text(negatives)}
        shape = (h, wd, self.decoder.module.config.c_in)
        out = self.runner(n, shape, ts, cond, uncond, w, seed, latents, step_noise)
        if output_type == "latent":
            return ImagePipelineOutput(self.plan.host(out)[:n])
        with self.vqgan.on_device() as variables:
            images = self.compiler(
                "vqgan", self.plan.per_device(decode_images, (None, 0)), {"module": self.vqgan.module}, variables, out
            )
        images = self.plan.host(images)[:n]
        return ImagePipelineOutput(to_pil(images) if output_type == "pil" else images)


class WuerstchenPipeline(LoraMixin):
    """Text → images: the prior and the decoder pipelines in sequence (diffusers' WuerstchenCombinedPipeline)."""

    def __init__(self, prior_pipe: WuerstchenPriorPipeline, decoder_pipe: WuerstchenDecoderPipeline):
        self.prior_pipe, self.decoder_pipe = prior_pipe, decoder_pipe

    def _lora(self) -> dict:  # the prior pipeline's adapters are the combined pipeline's
        return self.prior_pipe._lora()

    def load_effnet(self, path: Any, dtype: Any = jnp.float32) -> None:
        """The EfficientNet encoder for image-to-image (`image=`, `strength=`; see the prior pipeline's), shared
        with the decoder pipeline for image variation (`pipe.decoder_pipe(image=...)`)."""
        self.prior_pipe.load_effnet(path, dtype)
        self.decoder_pipe.effnet = self.prior_pipe.effnet

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
        variant: str | None = None,
    ) -> WuerstchenPipeline:
        """`decoder`: a `warp-ai/wuerstchen`-style folder, or a combined folder (with `prior_prior/`, …);
        `prior`: a `warp-ai/wuerstchen-prior`-style folder. `offload` keeps inactive stages in host memory;
        `mesh` (`wurst_jax.make_mesh(...)`) with `sharding` "dp" (default), "fsdp" or "tp" shards every stage;
        `variant` ("bf16") reads diffusers' variant weight files (`*.bf16.safetensors`)."""
        compiler = CompileCache(progress)
        opts = dict(dtype=dtype, offload=offload, mesh=mesh, sharding=sharding, progress=progress, compiler=compiler)
        opts["variant"] = variant
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
        image: Any = None,
        strength: float = 1.0,
    ) -> ImagePipelineOutput:
        """Arguments and defaults as diffusers' WuerstchenCombinedPipeline, with `seed` for generators.

        Images come out grouped by prompt: prompt 0's `num_images_per_prompt` images first. `latents` are the
        initial prior latents [N, h, w, 16]; `decoder_latents` [N, H, W, 4] and the `*_step_noise` arrays
        [S, N, ...] replace what `seed` would draw (for exact replays).
        """
        prompts = None if prompt is None else args.as_list("prompt", prompt)
        n = (len(prompts) if prompts else np.shape(prompt_embeds)[0]) * args.check_int(
            "num_images_per_prompt", num_images_per_prompt
        )
        self.decoder_pipe.latent_size(*self.prior_pipe.latent_size(height, width))  # fail before any work
        if image is not None and image_to_image.check_strength(strength, image) < 1.0:  # one prompt, k images
            n = image_to_image.paired(n, num_images_per_prompt, image_to_image.count(image))
        random.check_seed(seed, n)  # before any work
        args.check_output_type(output_type, ("pil", "np", "latent"))
        seed = seed if seed is not None else random.fresh_seed()
        emb, n = self.prior_pipe._embeddings(
            prompts, height, width, prior_num_inference_steps, prior_timesteps, prior_guidance_scale, negative_prompt,
            prompt_embeds, negative_prompt_embeds, num_images_per_prompt, seed, latents, prior_step_noise, "np", image,
            strength,
        )  # fmt: skip
        return self.decoder_pipe._decode(
            emb, n, prompts or "", num_inference_steps, decoder_timesteps, decoder_guidance_scale, negative_prompt, 1,
            seed, decoder_latents, output_type, decoder_step_noise,
        )  # fmt: skip
