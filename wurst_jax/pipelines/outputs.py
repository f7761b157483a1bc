"""What the pipelines return, and their image output (PIL)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class ImagePipelineOutput:
    """`images`: a list of PIL images, an array [N, H, W, 3] in [0, 1] ("np"), or decoder latents ("latent")."""

    images: Any


@dataclasses.dataclass
class WuerstchenPriorPipelineOutput:
    """`image_embeddings`: Stage C output mapped for Stage B ([N, h, w, 16], NHWC)."""

    image_embeddings: Any


def to_pil(images: np.ndarray) -> list:
    """[N, H, W, 3] floats in [0, 1] → PIL images (rounded as diffusers' `numpy_to_pil`)."""
    from PIL import Image

    return [Image.fromarray(img) for img in (np.asarray(images) * 255).round().astype(np.uint8)]


@dataclasses.dataclass
class StableCascadePriorPipelineOutput:
    """Stable Cascade prior: `image_embeddings` (stage C latents [N, h, w, 16], NHWC) and the text conditioning
    it ran with, one row per image: `prompt_embeds` [N, 77, D], `prompt_embeds_pooled` [N, 1, P], and the
    negative ones (None without classifier-free guidance)."""

    image_embeddings: Any
    prompt_embeds: Any = None
    prompt_embeds_pooled: Any = None
    negative_prompt_embeds: Any = None
    negative_prompt_embeds_pooled: Any = None
