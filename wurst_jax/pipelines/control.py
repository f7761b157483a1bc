"""A stage C ControlNet attached to the Stable Cascade prior pipeline: loaded once, its control computed once per
call on the device (the condition filters run on the host) and handed to the one compiled prior loop as an
argument, so a new `control_image` or `controlnet_conditioning_scale` reuses the compiled loop.

The kind of condition follows the ControlNet's input channels (1: "canny", 4: "inpaint", 16: "sr", the
released files) unless `control_type` says otherwise. As the original notebooks, the unconditional half of a
guided batch gets the same (scaled) control as the conditional one; inpainting feeds the ControlNet the image with
the masked pixels set to white plus the mask, and the sampler starts from noise (the original keeps nothing of
the unmasked region by construction: `filters.composite` pastes it back when wanted). A super-resolution ("sr")
ControlNet also needs Stable Cascade's EfficientNet encoder (`effnet=`: the original `effnet_encoder.safetensors`
converted, or any folder `load_component` reads as kind "effnet"): the condition is the original's
`SREffnetFilter`, nearest ½ downscale → the encoder → nearest ×2 upscale, made on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from wurst_jax.controlnet import filters, stage_c
from wurst_jax.models.cascade.controlnet import StableCascadeControlNet
from wurst_jax.models.effnet import EfficientNetEncoder

KIND_BY_CHANNELS = {1: "canny", 4: "inpaint", 16: "sr"}


class Controller:
    """A loaded ControlNet (module, variables) and the kind of condition it takes."""

    def __init__(self, controlnet: Any, control_type: str | None = None, dtype: Any = jnp.float32, effnet: Any = None):
        from wurst_jax.weights import load_component

        if isinstance(controlnet, (str, Path)):
            controlnet = load_component(controlnet, dtype)
        if not (isinstance(controlnet, tuple) and len(controlnet) == 2):
            raise ValueError("`controlnet` must be a path or a (module, variables) pair from wj.load_component")
        self.module, self.variables = controlnet
        if not isinstance(self.module, StableCascadeControlNet):
            raise ValueError(f"`controlnet` must be a Stable Cascade ControlNet, got {type(self.module).__name__}")
        c_in = self.module.config.c_in
        kind = control_type or KIND_BY_CHANNELS.get(c_in)
        if kind not in stage_c.KINDS:
            raise ValueError(f"`control_type` must be one of {stage_c.KINDS} for a ControlNet with c_in={c_in}")
        self.kind = kind
        self.effnet = None
        if kind != "sr" and effnet is not None:
            raise ValueError(f"`effnet` is for an sr ControlNet; this one is {kind!r}")
        if kind == "sr":
            if effnet is None:
                raise ValueError("an sr ControlNet needs the EfficientNet encoder: effnet=PATH (effnet_encoder)")
            # f32: the condition is made once per call and the encoder is small
            self.effnet = load_component(effnet, jnp.float32) if isinstance(effnet, (str, Path)) else effnet
            if not (isinstance(self.effnet, tuple) and isinstance(self.effnet[0], EfficientNetEncoder)):
                raise ValueError("`effnet` must be a path or a (module, variables) pair of an EfficientNet encoder")
            if self.effnet[0].config.c_latent != c_in:
                raise ValueError(
                    f"the EfficientNet encoder gives {self.effnet[0].config.c_latent} channels; the ControlNet "
                    f"takes {c_in}"
                )

    def condition(self, image: Any, mask: Any = None) -> np.ndarray:
        """The ControlNet input [B, H, W, c_in] for `image` (PIL, uint8 or float [0, 1] arrays, one or a batch)."""
        if mask is not None and self.kind != "inpaint":
            raise ValueError(f"`mask_image` is only for an inpaint ControlNet; this one is {self.kind!r}")
        if self.kind == "inpaint" and mask is None:
            raise ValueError("an inpaint ControlNet needs `mask_image` (True / white where the image is generated)")
        pil = lambda im: np.asarray(im.convert("RGB")) if hasattr(im, "convert") else im  # noqa: E731
        images = filters.as_float_images([pil(i) for i in image] if isinstance(image, list) else pil(image))
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = np.asarray(mask.convert("L") if hasattr(mask, "convert") else mask)
        if mask is not None and mask.dtype != bool:
            mask = mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
        return stage_c.make_condition(self.kind, images, mask, self.effnet)

    def control(self, image: Any, scale: float, n: int, mask: Any = None) -> tuple:
        """The scaled control, one row per image: [n, h, w, c] or None per ResBlock (host arrays)."""
        scale = float(scale)
        cond = self.condition(image, mask)
        out = stage_c.compute_control(self.module, self.variables, cond, scale=scale)
        rows = cond.shape[0]
        if rows not in (1, n):
            raise ValueError(f"`control_image` has {rows} images; expected 1 (shared) or {n} (one per image)")
        return tuple(None if c is None else np.repeat(np.asarray(c, np.float32), n // rows, axis=0) for c in out)
