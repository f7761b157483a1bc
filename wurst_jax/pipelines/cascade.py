"""Stable Cascade (Würstchen v3) decoder and text-to-image pipelines, with the arguments of diffusers'
`StableCascadeDecoderPipeline` and `StableCascadeCombinedPipeline`.

The decoder (stage B, then stage A's VQGAN) sees the stage C latents (`image_embeddings`, [B, h, w, 16]) and the
pooled text embedding only ([N, 1, P]); its unconditional half has zero `effnet` and the negative prompt's pooled
embedding. `StableCascadeCombinedPipeline` runs the prior (`cascade_prior.py`) and hands the decoder its latents on
the device and, as diffusers does, the prior's pooled text embeddings (both released stages use the same ViT-bigG
text encoder). Each stage's loop is one compiled function (`runner.py`); `seed` makes a call reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from wurst_jax.lora.pipeline import LoraMixin
from wurst_jax.pipelines import args, image_to_image, random
from wurst_jax.pipelines.cascade_prior import StableCascadePriorPipeline, pooled_array
from wurst_jax.pipelines.components import Component, load_pipeline_folder
from wurst_jax.pipelines.outputs import ImagePipelineOutput, to_pil
from wurst_jax.pipelines.runner import StageRunner, decode_images, setup_plan
from wurst_jax.pipelines.runtime import CompileCache, default_compilation_cache
from wurst_jax.pipelines.text import TextEncoder
from wurst_jax.samplers import DDPMWuerstchen, Sampler
from wurst_jax.sharding import ShardingPlan


def cascade_decoder_model(module, variables, x, r, cond):
    """Stage B: x [B, H, W, 4], r [B], cond {"effnet": [B, h, w, 16], "pooled": [B, 1, Cp]}."""
    return module.apply(variables, x, r, cond["pooled"], effnet=cond["effnet"])


class StableCascadeDecoderPipeline:
    """image_embeddings (+ text) → images, as diffusers' StableCascadeDecoderPipeline (stage B loop + stage A)."""

    def __init__(
        self,
        decoder: Component,
        tokenizer: Any,
        text_encoder: Component,
        scheduler: Sampler | None,
        vqgan: Component,
        latent_dim_scale: float = 10.67,
        progress: bool = True,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        compiler: CompileCache | None = None,
    ):
        self.plan, self.compiler = setup_plan(mesh, sharding, progress, compiler)
        self.text = TextEncoder(tokenizer, text_encoder, self.plan, self.compiler)
        self.decoder, self.vqgan, self.scheduler = decoder, vqgan, scheduler or DDPMWuerstchen()
        self.latent_dim_scale, self.progress = latent_dim_scale, progress
        streams = (random.Stream.DECODER_LATENTS, random.Stream.DECODER_STEPS)
        self.runner = StageRunner(
            "decoder", decoder, cascade_decoder_model, self.scheduler, self.plan, self.compiler, streams
        )

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
    ) -> StableCascadeDecoderPipeline:
        """A `stabilityai/stable-cascade`-style folder (decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/);
        `variant` ("bf16") reads diffusers' variant weight files."""
        plan = ShardingPlan(mesh, sharding or "dp")
        default_compilation_cache()  # the per-user persistent cache unless the caller chose (runtime.py)
        names = ("decoder", "vqgan", "text_encoder", "tokenizer")
        parts = load_pipeline_folder(path, names, dtype, offload, "", plan, variant=variant)
        cfg = {k: parts["config"][k] for k in ("latent_dim_scale",) if k in parts["config"]}
        return cls(
            parts["decoder"],
            parts["tokenizer"],
            parts["text_encoder"],
            parts["scheduler"],
            parts["vqgan"],
            progress=progress,
            mesh=mesh,
            sharding=sharding,
            compiler=compiler,
            **cfg,
        )

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """Stage C grid → stage B grid: int(size · latent_dim_scale), which stage B must be able to patch and halve."""
        size = (int(h * self.latent_dim_scale), int(w * self.latent_dim_scale))
        cfg = self.decoder.module.config
        if any(s < cfg.downscale or s % cfg.patch_size for s in size):
            raise ValueError(
                f"a {h}×{w} prior latent gives a {size[0]}×{size[1]} decoder latent; stage B needs multiples of "
                f"{cfg.patch_size} of at least {cfg.downscale} (height/width = prior size × 42.67, e.g. 1024 → 24)"
            )
        return size

    def pooled(self, prompt: Any, prompt_embeds_pooled: Any, name: str = "prompt") -> np.ndarray:
        """Pooled text embeddings [B, 1, P] of the prompts, or the given ones."""
        if prompt_embeds_pooled is not None:
            return pooled_array(f"{name}_embeds_pooled", prompt_embeds_pooled)
        return self.text.with_pooled(args.as_list(name, prompt))[1]

    def __call__(
        self,
        image_embeddings: Any,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 10,
        timesteps: list[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Any = None,
        prompt_embeds_pooled: Any = None,
        negative_prompt_embeds: Any = None,
        negative_prompt_embeds_pooled: Any = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: Any = None,
        output_type: str = "pil",
        step_noise: Any = None,
    ) -> ImagePipelineOutput:
        """`image_embeddings` [B, h, w, 16] (or a list of such arrays); each makes `num_images_per_prompt` images.
        Text: `prompt` (one for all, or k prompts each covering consecutive images) or `prompt_embeds_pooled`
        ([k, 1, P] or [k, P]). Stage B reads only the pooled embeddings: `prompt_embeds` /
        `negative_prompt_embeds` are accepted for diffusers' signature and not used. With guidance > 1 the
        negative pooled embeddings are `negative_prompt_embeds_pooled`, else those of `negative_prompt` (or "")."""
        del prompt_embeds, negative_prompt_embeds  # stage B has no text-state input
        if prompt is None and prompt_embeds_pooled is None:
            raise ValueError("pass `prompt` or `prompt_embeds_pooled`")
        if prompt is not None and prompt_embeds_pooled is not None:
            raise ValueError("pass at most one of `prompt` and `prompt_embeds_pooled`")
        if negative_prompt is not None and negative_prompt_embeds_pooled is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds_pooled`")
        emb = image_embeddings
        if isinstance(emb, (list, tuple)):
            emb = np.concatenate([ShardingPlan.host(e) for e in emb], axis=0)
        if not isinstance(emb, jax.Array):
            emb = np.asarray(emb, np.float32)
        w = args.check_guidance("guidance_scale", guidance_scale)
        pooled = self.pooled(prompt, prompt_embeds_pooled)

        def negatives() -> np.ndarray:
            if negative_prompt_embeds_pooled is not None:
                neg = pooled_array("negative_prompt_embeds_pooled", negative_prompt_embeds_pooled)
                if neg.shape != pooled.shape:
                    raise ValueError(f"`negative_prompt_embeds_pooled` {neg.shape} must have the shape {pooled.shape}")
                return neg
            return self.text.with_pooled(args.negatives(negative_prompt, pooled.shape[0]))[1]

        return self._decode(
            emb, int(np.shape(emb)[0]), num_images_per_prompt, pooled, negatives if w > 1 else None,
            num_inference_steps, timesteps, w, seed, latents, output_type, step_noise,
        )  # fmt: skip

    def _decode(
        self, emb, b, num_images_per_prompt, pooled, negatives, num_inference_steps, timesteps, guidance, seed,
        latents, output_type, step_noise,
    ) -> ImagePipelineOutput:  # fmt: skip
        """`emb` [B or padded B, h, w, C] (host or device; its first `b` rows are real); `pooled` [k, 1, P] rows
        each covering N / k consecutive images; `negatives()` gives the unconditional pooled rows (guided only)."""
        c_eff = self.decoder.module.config.effnet_in_channels
        if len(np.shape(emb)) != 4 or np.shape(emb)[-1] != c_eff:
            raise ValueError(f"`image_embeddings` must be [B, h, w, {c_eff}], got shape {np.shape(emb)}")
        n_per = args.check_int("num_images_per_prompt", num_images_per_prompt)
        ts = args.schedule(self.scheduler, "num_inference_steps", num_inference_steps, timesteps)
        args.check_output_type(output_type, ("pil", "np", "latent"))
        n = b * n_per
        if not (isinstance(emb, jax.Array) and n_per == 1 and emb.shape[0] == self.plan.padded(b)):
            emb = np.repeat(self.plan.host(emb)[:b].astype(np.float32), n_per, axis=0)
        else:  # the prior's (padded) output: it stays where it is
            emb = emb.astype(jnp.float32)
        h, wd = self.latent_size(emb.shape[1], emb.shape[2])
        cond = {"effnet": emb, "pooled": args.rows_per_image("prompt_embeds_pooled", pooled, n)}
        uncond = None
        if negatives is not None:
            neg = args.rows_per_image("negative_prompt_embeds_pooled", negatives(), n)
            uncond = {"effnet": np.zeros(emb.shape, np.float32), "pooled": neg}
        shape = (h, wd, self.decoder.module.config.in_channels)
        out = self.runner(n, shape, ts, cond, uncond, guidance, seed, latents, step_noise)
        if output_type == "latent":
            return ImagePipelineOutput(self.plan.host(out)[:n])
        with self.vqgan.on_device() as variables:
            images = self.compiler(
                "vqgan", self.plan.per_device(decode_images, (None, 0)), {"module": self.vqgan.module}, variables, out
            )
        images = self.plan.host(images)[:n]
        return ImagePipelineOutput(to_pil(images) if output_type == "pil" else images)


class StableCascadeCombinedPipeline(LoraMixin):
    """Text (+ images) → images: the prior and the decoder pipelines in sequence (diffusers'
    StableCascadeCombinedPipeline). LoRA methods act on the prior pipeline's stage C and text encoder."""

    def __init__(self, prior_pipe: StableCascadePriorPipeline, decoder_pipe: StableCascadeDecoderPipeline):
        self.prior_pipe, self.decoder_pipe = prior_pipe, decoder_pipe

    def _lora(self) -> dict:  # the prior pipeline's adapters are the combined pipeline's
        return self.prior_pipe._lora()

    def _lora_host(self):  # and so are its tokenizer's train tokens
        return self.prior_pipe

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
        controlnet: Any = None,
        control_type: str | None = None,
        effnet: Any = None,
    ) -> StableCascadeCombinedPipeline:
        """`decoder`: a `stabilityai/stable-cascade`-style folder, or a combined folder (with `prior_prior/`, …);
        `prior`: a `stabilityai/stable-cascade-prior`-style folder. `offload` keeps inactive stages in host
        memory; `mesh` (`wurst_jax.make_mesh(...)`) with `sharding` "dp" (default), "fsdp" or "tp" shards them.
        `controlnet`: a stage C ControlNet for the prior, `effnet`: the EfficientNet encoder an sr ControlNet needs
        (see StableCascadePriorPipeline.from_pretrained); `variant` ("bf16") reads diffusers' variant weight files
        (`*.bf16.safetensors`, as the Hub's stable-cascade folders)."""
        compiler = CompileCache(progress)
        opts = dict(dtype=dtype, offload=offload, mesh=mesh, sharding=sharding, progress=progress, compiler=compiler)
        opts["variant"] = variant
        if prior is None:
            prior_pipe = StableCascadePriorPipeline.from_pretrained(decoder, prefix="prior_", **opts)
        else:
            prior_pipe = StableCascadePriorPipeline.from_pretrained(prior, **opts)
        if controlnet is not None:
            prior_pipe.load_controlnet(controlnet, control_type, effnet)
        return cls(prior_pipe, StableCascadeDecoderPipeline.from_pretrained(decoder, **opts))

    def load_controlnet(self, controlnet: Any, control_type: str | None = None, effnet: Any = None) -> None:
        """Attach a stage C ControlNet to the prior (path or (module, variables); an sr one with its `effnet`);
        None detaches it."""
        self.prior_pipe.load_controlnet(controlnet, control_type, effnet)

    def load_effnet(self, path: Any, dtype: Any = jnp.float32) -> None:
        """The EfficientNet encoder for image-to-image (`init_image=`, `strength=`): see the prior pipeline's."""
        self.prior_pipe.load_effnet(path, dtype)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images: Any = None,
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
        prompt_embeds_pooled: Any = None,
        negative_prompt_embeds: Any = None,
        negative_prompt_embeds_pooled: Any = None,
        image_embeds: Any = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: Any = None,
        output_type: str = "pil",
        decoder_latents: Any = None,
        prior_step_noise: Any = None,
        decoder_step_noise: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float = 1.0,
        mask_image: Any = None,
        prior_shift: float = 1.0,
        init_image: Any = None,
        strength: float = 1.0,
    ) -> ImagePipelineOutput:
        """Arguments and defaults as diffusers' StableCascadeCombinedPipeline (512², 60 prior and 12 decoder
        steps), with `seed` for generators and honoured `prior_timesteps` / `decoder_timesteps`.

        Images come out grouped by prompt. The decoder is conditioned on the prior's pooled text embeddings (as
        diffusers); with decoder guidance > 1 and no prior guidance the negative ones are encoded here (diffusers
        fails there). `latents` [N, h, w, 16], `decoder_latents` [N, H, W, 4] and the `*_step_noise` arrays
        [S, N, ...] replace what `seed` would draw (for exact replays). `control_image`,
        `controlnet_conditioning_scale`, `mask_image`: the prior's ControlNet inputs, `prior_shift` its schedule
        shift (see the prior pipeline). `init_image`, `strength`: the prior's image-to-image (`load_effnet` first;
        see the prior pipeline).
        """
        n_per = args.check_int("num_images_per_prompt", num_images_per_prompt)
        if prompt is not None:
            b = len(args.as_list("prompt", prompt))
        elif prompt_embeds is not None:
            b = int(np.shape(prompt_embeds)[0])
        else:
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        self.decoder_pipe.latent_size(*self.prior_pipe.latent_size(height, width))  # fail before any work
        n = b * n_per
        if init_image is not None and image_to_image.check_strength(strength, init_image, "init_image") < 1.0:
            n = image_to_image.paired(n, n_per, image_to_image.count(init_image))  # one prompt over k images
        random.check_seed(seed, n)  # before any work
        args.check_output_type(output_type, ("pil", "np", "latent"))
        w_dec = args.check_guidance("decoder_guidance_scale", decoder_guidance_scale)
        seed = seed if seed is not None else random.fresh_seed()
        emb, n, (_, pooled, _, neg_pooled) = self.prior_pipe._run(
            prompt, images, height, width, prior_num_inference_steps, prior_timesteps, prior_guidance_scale,
            negative_prompt, prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds,
            negative_prompt_embeds_pooled, image_embeds, n_per, seed, latents, prior_step_noise,
            control=(control_image, controlnet_conditioning_scale, mask_image), shift=prior_shift,
            init=(init_image, strength),
        )  # fmt: skip

        def negatives() -> np.ndarray:  # the prior ran without guidance: encode them as it would have
            if neg_pooled is not None:
                return neg_pooled
            if negative_prompt_embeds_pooled is not None:
                return np.repeat(pooled_array("negative_prompt_embeds_pooled", negative_prompt_embeds_pooled), n_per, 0)
            return np.repeat(self.prior_pipe.text.with_pooled(args.negatives(negative_prompt, b))[1], n_per, 0)

        return self.decoder_pipe._decode(
            emb, n, 1, pooled, negatives if w_dec > 1 else None, num_inference_steps, decoder_timesteps, w_dec,
            seed, decoder_latents, output_type, decoder_step_noise,
        )  # fmt: skip
