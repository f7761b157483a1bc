"""Stable Cascade (Würstchen v3) prior: text, and optionally images, → stage C latents, with the arguments of
diffusers' `StableCascadePriorPipeline`.

`StableCascadePriorPipeline.from_pretrained` loads a `stabilityai/stable-cascade-prior`-style folder (prior/,
text_encoder/, tokenizer/, scheduler/, and for image variation image_encoder/ + feature_extractor/). The text
conditioning is the text encoder's last layer before its final norm ([N, 77, D]) and its pooled projection
([N, 1, P]); each image is one CLIP image token ([N, k, 768] for k images), zeros when there is none and in the
unconditional half. Stage C's whole loop is one compiled function (`runner.py`), guidance as one batch.

Image-to-image (`init_image=`, `strength=`) starts stage C from the image's EfficientNet latents (Stable
Cascade's `effnet_encoder.safetensors`, `load_effnet`) noised to t = `strength`, as the original's image-to-image
recipe (`image_to_image.py`). The start image is `init_image`, not diffusers' `image`: this pipeline already has
diffusers' `images=` (image variation through CLIP image tokens), and `image=` beside `images=` would turn a
one-letter slip into the other feature; both may be given together.
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
from wurst_jax.models.clip_image import ImageProcessorConfig, preprocess
from wurst_jax.pipelines import args, image_to_image, random
from wurst_jax.pipelines.components import Component, load_pipeline_folder
from wurst_jax.pipelines.control import Controller
from wurst_jax.pipelines.outputs import StableCascadePriorPipelineOutput
from wurst_jax.pipelines.runner import StageRunner, setup_plan
from wurst_jax.pipelines.runtime import CompileCache, default_compilation_cache
from wurst_jax.pipelines.text import TextEncoder
from wurst_jax.samplers import DDPMWuerstchen, Sampler
from wurst_jax.sharding import ShardingPlan


def cascade_prior_model(module, variables, x, r, cond):
    """Stage C: x [B, h, w, 16], r [B], cond {"text": [B, 77, Ct], "pooled": [B, 1, Cp], "image": [B, k, Ci]},
    optionally "control" (a ControlNet's per-ResBlock tensors; absent: plain stage C, the same program as before)."""
    return module.apply(variables, x, r, cond["pooled"], cond["text"], cond["image"], control=cond.get("control"))


def encode_images(variables: Any, pixels: jax.Array, *, module: Any) -> jax.Array:
    """The compiled image function: CLIP pixels [B, S, S, 3] → image_embeds [B, P]."""
    return module.apply(variables, pixels).image_embeds


def image_processor(feature_extractor: dict | None, image_size: int) -> ImageProcessorConfig:
    """The folder's feature_extractor (preprocessor_config.json as a dict: mean, std, size, crop_size, resample,
    do_center_crop, ...), or without one CLIP's preprocessing at the encoder's `image_size`; ValueError when it
    cannot give the encoder its image_size × image_size input."""
    if feature_extractor is None:
        return ImageProcessorConfig(size=image_size, crop_size=(image_size, image_size))
    where = "feature_extractor/preprocessor_config.json"
    try:
        config = ImageProcessorConfig.from_dict(feature_extractor)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    out = config.output_size()
    if out != (image_size, image_size):
        made = f"{out[0]}×{out[1]} images" if out else "images of each input's aspect ratio (no center crop)"
        raise ValueError(f"{where}: gives {made}; the image encoder takes {image_size}×{image_size}")
    return config


class ImageEncoder:
    """Images (PIL or uint8 arrays) → CLIP image embeddings [k, P] (numpy), preprocessed as the folder's
    `feature_extractor` (CLIPImageProcessor) says."""

    def __init__(self, encoder: Component, feature_extractor: dict | None, plan: ShardingPlan, compiler: CompileCache):
        self.processor = image_processor(feature_extractor, encoder.module.config.image_size)
        self.encoder, self.plan, self.compiler = encoder, plan, compiler

    def __call__(self, images: Any) -> np.ndarray:
        pixels = preprocess(images, config=self.processor)
        with self.encoder.on_device() as variables:
            fn = self.plan.per_device(encode_images, (None, 0))
            out = self.compiler(
                "image_encoder", fn, {"module": self.encoder.module}, variables, self.plan.batch(pixels)
            )
        return self.plan.host(out)[: len(pixels)].astype(np.float32)


def _array(name: str, value: Any, ndims: tuple[int, ...], channels: int | None = None) -> np.ndarray:
    arr = ShardingPlan.host(value).astype(np.float32)
    if arr.ndim not in ndims or (channels is not None and arr.shape[-1] != channels):
        want = " or ".join(f"{d}-D" for d in ndims) + (f" with {channels} channels last" if channels else "")
        raise ValueError(f"`{name}` must be {want}, got shape {arr.shape}")
    return arr


def pooled_array(name: str, value: Any) -> np.ndarray:
    """Pooled text embeddings [B, 1, P], also accepted as [B, P] (one token each)."""
    arr = _array(name, value, (2, 3))
    arr = arr[:, None] if arr.ndim == 2 else arr
    if arr.shape[1] != 1:
        raise ValueError(f"`{name}` must be [B, 1, P] or [B, P], got shape {arr.shape}")
    return arr


class StableCascadePriorPipeline(LoraMixin):
    """Text (+ images) → stage C latents (`image_embeddings`), as diffusers' StableCascadePriorPipeline. LoRA
    (`load_lora_weights`, ...): original Stable Cascade files (`lora.safetensors`) or diffusers/PEFT ones."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Component,
        prior: Component,
        scheduler: Sampler | None = None,
        resolution_multiple: float = 42.67,
        feature_extractor: dict | None = None,
        image_encoder: Component | None = None,
        progress: bool = True,
        mesh: Mesh | None = None,
        sharding: str | None = None,
        compiler: CompileCache | None = None,
        controlnet: Any = None,
        control_type: str | None = None,
        effnet: Any = None,
    ):
        self.plan, self.compiler = setup_plan(mesh, sharding, progress, compiler)
        self.text = TextEncoder(tokenizer, text_encoder, self.plan, self.compiler)
        self.images = None
        if image_encoder is not None:
            self.images = ImageEncoder(image_encoder, feature_extractor, self.plan, self.compiler)
        self.prior, self.scheduler = prior, scheduler or DDPMWuerstchen()
        self.resolution_multiple, self.progress = resolution_multiple, progress
        self.controller = None
        if controlnet is not None:
            given = isinstance(controlnet, Controller)
            self.controller = controlnet if given else Controller(controlnet, control_type, effnet=effnet)
        streams = (random.Stream.PRIOR_LATENTS, random.Stream.PRIOR_STEPS)
        self.runner = StageRunner(
            "prior", prior, cascade_prior_model, self.scheduler, self.plan, self.compiler, streams
        )
        self.runner.adapters = lambda: self._lora()["prior"].loop_adapters()
        self.effnet: Component | None = None  # the EfficientNet encoder, for image-to-image (`load_effnet`)

    def _lora_components(self) -> dict:
        """LoRA file prefixes → (component, applied inside the loop); ReToken rows go to the text encoder."""
        return {"prior": (self.prior, True), "text_encoder": (self.text.encoder, False)}

    def load_effnet(self, path: Any, dtype: Any = jnp.float32) -> None:
        """The EfficientNet encoder `init_image=` is encoded with: Stable Cascade's `effnet_encoder.safetensors`
        (the file itself, or a folder converted from it with `wurst-jax convert ... --stage effnet_encoder`), or
        `wj.load_component`'s (module, variables)."""
        self.effnet = image_to_image.load_effnet(path, dtype)

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
        controlnet: Any = None,
        control_type: str | None = None,
        effnet: Any = None,
    ) -> StableCascadePriorPipeline:
        """A `stabilityai/stable-cascade-prior`-style folder; image_encoder/ and feature_extractor/ are optional
        (needed for `images=`). `prefix` names the parts inside a combined folder (`prior_`). `controlnet`: a
        stage C ControlNet (a converted folder / file path, or `wj.load_component`'s (module, variables)); `effnet`:
        for a super-resolution ControlNet, Stable Cascade's EfficientNet encoder (path or (module, variables)).
        `variant` ("bf16") reads diffusers' variant weight files."""
        plan = ShardingPlan(mesh, sharding or "dp")
        default_compilation_cache()  # the per-user persistent cache unless the caller chose (runtime.py)
        parts = load_pipeline_folder(
            path,
            ("prior", "text_encoder", "tokenizer"),
            dtype,
            offload,
            prefix,
            plan,
            optional=("image_encoder", "feature_extractor"),
            variant=variant,
        )
        cfg = {k: parts["config"][k] for k in ("resolution_multiple",) if k in parts["config"]}
        return cls(
            parts["tokenizer"],
            parts["text_encoder"],
            parts["prior"],
            parts["scheduler"],
            feature_extractor=parts["feature_extractor"],
            image_encoder=parts["image_encoder"],
            progress=progress,
            mesh=mesh,
            sharding=sharding,
            compiler=compiler,
            controlnet=None if controlnet is None else Controller(controlnet, control_type, dtype, effnet),
            control_type=control_type,
            **cfg,
        )

    def load_controlnet(self, controlnet: Any, control_type: str | None = None, effnet: Any = None) -> None:
        """Attach a stage C ControlNet (path or (module, variables); an sr one with its `effnet`); None detaches
        it."""
        self.controller = None if controlnet is None else Controller(controlnet, control_type, effnet=effnet)

    def _control(self, n: int, image: Any, scale: Any, mask: Any) -> tuple | None:
        """The ControlNet's scaled control for n images, or None without a ControlNet / control image."""
        if image is None:
            if mask is not None:
                raise ValueError("`mask_image` needs `control_image` (the image to inpaint)")
            return None
        if self.controller is None:
            raise ValueError("`control_image` needs a ControlNet (from_pretrained(controlnet=...) / load_controlnet)")
        return self.controller.control(image, args.check_guidance("controlnet_conditioning_scale", scale), n, mask)

    def latent_size(self, height: Any, width: Any) -> tuple[int, int]:
        """Pixel size → stage C grid, ceil(size / resolution_multiple) as diffusers."""
        h, w = args.check_int("height", height), args.check_int("width", width)
        return math.ceil(h / self.resolution_multiple), math.ceil(w / self.resolution_multiple)

    def encode_prompt(
        self,
        prompt: Any,
        negative_prompt: Any,
        num_images_per_prompt: int,
        use_cfg: bool,
        prompt_embeds: Any = None,
        prompt_embeds_pooled: Any = None,
        negative_prompt_embeds: Any = None,
        negative_prompt_embeds_pooled: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(text [N, T, D], pooled [N, 1, P], negative text, negative pooled), one row per image; the negatives
        are None without `use_cfg`."""
        if prompt_embeds is None:
            text, pooled = self.text.with_pooled(args.as_list("prompt", prompt))
        else:
            if prompt_embeds_pooled is None:
                raise ValueError("`prompt_embeds` needs `prompt_embeds_pooled` (the same text encoder's text_embeds)")
            text, pooled = (
                _array("prompt_embeds", prompt_embeds, (3,)),
                pooled_array("prompt_embeds_pooled", prompt_embeds_pooled),
            )
            if pooled.shape[0] != text.shape[0]:
                raise ValueError(f"`prompt_embeds_pooled` has {pooled.shape[0]} rows, `prompt_embeds` {text.shape[0]}")
        b = text.shape[0]
        rep = lambda x: np.repeat(x, num_images_per_prompt, axis=0)  # noqa: E731
        if not use_cfg:
            return rep(text), rep(pooled), None, None
        if negative_prompt_embeds is not None:
            if negative_prompt_embeds_pooled is None:
                raise ValueError("`negative_prompt_embeds` needs `negative_prompt_embeds_pooled`")
            neg = _array("negative_prompt_embeds", negative_prompt_embeds, (3,))
            neg_pooled = pooled_array("negative_prompt_embeds_pooled", negative_prompt_embeds_pooled)
            if neg.shape != text.shape or neg_pooled.shape != pooled.shape:
                raise ValueError(
                    f"negative embeddings {neg.shape} / {neg_pooled.shape} must have the shapes of the prompt's "
                    f"{text.shape} / {pooled.shape}"
                )
        else:
            neg, neg_pooled = self.text.with_pooled(args.negatives(negative_prompt, b))
        return rep(text), rep(pooled), rep(neg), rep(neg_pooled)

    def encode_image(self, images: Any, image_embeds: Any, b: int, n_per: int) -> np.ndarray:
        """Image tokens [N, k, Ci] per image: every image of `images` is one token shared by all prompts;
        `image_embeds` [1 or B, k, Ci] (or [1 or B, Ci]); without either, one zero token."""
        c = self.prior.module.config.clip_image_in_channels
        n = b * n_per
        if images is not None and image_embeds is not None:
            raise ValueError("pass at most one of `images` and `image_embeds`")
        if images is not None:
            if self.images is None:
                raise ValueError("`images` needs an image_encoder/ (and feature_extractor/) in the prior folder")
            tokens = self.images(images)[None]  # [1, k, P]: one token per image
        elif image_embeds is not None:
            tokens = _array("image_embeds", image_embeds, (2, 3), c)
            tokens = tokens[:, None] if tokens.ndim == 2 else tokens
            if tokens.shape[0] not in (1, b):
                raise ValueError(f"`image_embeds` has {tokens.shape[0]} rows; expected 1 (shared) or {b} (per prompt)")
        else:
            return np.zeros((n, 1, c), np.float32)
        if tokens.shape[-1] != c:
            raise ValueError(f"the image encoder gives {tokens.shape[-1]}-d embeddings; the prior expects {c}")
        return np.repeat(tokens, n // tokens.shape[0], axis=0)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images: Any = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 20,
        timesteps: list[float] | None = None,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Any = None,
        prompt_embeds_pooled: Any = None,
        negative_prompt_embeds: Any = None,
        negative_prompt_embeds_pooled: Any = None,
        image_embeds: Any = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: Any = None,
        output_type: str = "np",
        step_noise: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float = 1.0,
        mask_image: Any = None,
        shift: float = 1.0,
        init_image: Any = None,
        strength: float = 1.0,
    ) -> StableCascadePriorPipelineOutput:
        """Arguments and defaults as diffusers' StableCascadePriorPipeline, with `seed` for generators.
        `images`: one image or a list (each becomes one image token); `latents` [N, h, w, 16] and `step_noise`
        [S, N, h, w, 16] replace what `seed` draws. `output_type` "np" (host arrays) or "jax" (a device array).
        With a ControlNet: `control_image` (one image or one per generated image), `controlnet_conditioning_scale`
        and, for inpainting, `mask_image` (white / True = generate). `shift`: the original's schedule shift
        (`samplers.ddpm_wuerstchen.shift_timesteps`; its notebooks sample stage C with 2; 1: diffusers').
        Image-to-image: `init_image` (PIL, array [H, W, 3] or [B, H, W, 3], or a list; one for all prompts, one per
        prompt, or one prompt over several) and `strength` in (0, 1] (t_start: `int(num_inference_steps ·
        strength)` steps run; 1 = text-to-image)."""
        args.check_output_type(output_type, ("np", "jax"))
        emb, n, embeds = self._run(
            prompt, images, height, width, num_inference_steps, timesteps, guidance_scale, negative_prompt,
            prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds, negative_prompt_embeds_pooled, image_embeds,
            num_images_per_prompt, seed, latents, step_noise,
            control=(control_image, controlnet_conditioning_scale, mask_image), shift=shift,
            init=(init_image, strength),
        )  # fmt: skip
        if output_type == "np":
            emb = self.plan.host(emb)[:n]
        else:
            emb = emb[:n] if self.plan.mesh is None else jnp.asarray(self.plan.host(emb)[:n])
        return StableCascadePriorPipelineOutput(emb, *embeds)

    def _run(
        self, prompt, images, height, width, num_inference_steps, timesteps, guidance_scale, negative_prompt,
        prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds, negative_prompt_embeds_pooled, image_embeds,
        num_images_per_prompt, seed, latents, step_noise, control=(None, 1.0, None), shift=1.0, init=(None, 1.0),
    ) -> tuple[jax.Array, int, tuple]:  # fmt: skip
        """(stage C latents [padded N, h, w, C] on the device, N, the four text conditionings per image)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of `negative_prompt` and `negative_prompt_embeds`")
        n_per = args.check_int("num_images_per_prompt", num_images_per_prompt)
        w = args.check_guidance("guidance_scale", guidance_scale)
        init_image, strength = init[0], image_to_image.check_strength(init[1], init[0], "init_image")
        if init_image is not None and strength < 1.0:
            ts = image_to_image.schedule(self.scheduler, num_inference_steps, timesteps, strength, shift)
        else:  # strength 1: the image is noise only, exactly text-to-image
            init_image = None
            ts = args.schedule(self.scheduler, "num_inference_steps", num_inference_steps, timesteps, shift=shift)
        h, wd = self.latent_size(height, width)
        embeds = self.encode_prompt(
            prompt, negative_prompt, n_per, w > 1, prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds,
            negative_prompt_embeds_pooled,
        )  # fmt: skip
        text, pooled, neg, neg_pooled = embeds
        n = text.shape[0]
        image = self.encode_image(images, image_embeds, n // n_per, n_per)
        cond = {"text": text, "pooled": pooled, "image": image}
        uncond = None if neg is None else {"text": neg, "pooled": neg_pooled, "image": np.zeros_like(image)}
        shape = (h, wd, self.prior.module.config.in_channels)
        x_init = None
        if init_image is not None:  # stage C samples in the encoder's space itself (no v2-style 42× mapping)
            emb = image_to_image.encode_images(self, init_image, (h, wd), shape[-1], "init_image")
            cond, uncond, x_init = image_to_image.pair(cond, uncond, emb, n_per)
            n = x_init.shape[0]
            neg, neg_pooled = (None, None) if uncond is None else (uncond["text"], uncond["pooled"])
            embeds = (cond["text"], cond["pooled"], neg, neg_pooled)
        cn = self._control(n, *control)
        if cn is not None:  # the same control in both halves, as the original's `unconditions['cnet'] = cnet`
            cond["control"] = cn
            if uncond is not None:
                uncond["control"] = cn
        out = self.runner(n, shape, ts, cond, uncond, w, seed, latents, step_noise, x_init)
        return out, n, embeds
