"""Image-to-image for the Würstchen v2 prior: an image → EfficientNet semantic latents (the decoder's
`image_embeddings`, the prior's target) → noised to t = `strength` → the prior's remaining steps.

The schedule follows the original Stable Cascade recipe: with `num_inference_steps` n, `int(n · strength)` steps
evenly from t = strength to 0; with explicit `timesteps`, the ones below `strength` (after t_start itself).
`strength` 1 ignores the image (exactly text-to-image); `strength` → 0 returns the encoder's embeddings.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from wurst_jax.pipelines.components import Component


def check_strength(strength: Any, image: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be a number in (0, 1], got {strength!r}")
    if strength < 1.0 and image is None:
        raise ValueError("`strength` < 1 needs an `image` to start from")
    return float(strength)


def schedule(sampler: Any, num_inference_steps: Any, timesteps: Any, strength: float) -> np.ndarray:
    if timesteps is not None:
        return np.asarray(sampler.timesteps(timesteps=timesteps, t_start=strength), np.float32)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
    return np.asarray(sampler.timesteps(max(1, int(num_inference_steps * strength)), t_start=strength), np.float32)


def as_images(image: Any) -> np.ndarray:
    """PIL image(s) / arrays → float32 [B, H, W, 3] in [0, 1]."""
    items = image if isinstance(image, (list, tuple)) else [image]
    arrays = []
    for im in items:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        arrays += list(a) if a.ndim == 4 else [a]
    if not arrays or any(a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
        raise ValueError(
            f"`image` must be RGB images [H, W, 3] (PIL, arrays, a list, or [B, H, W, 3]); got {image!r:.80}"
        )
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"`image`: the images differ in size {sorted({a.shape for a in arrays})}; resize them first")
    return np.stack(arrays)


def load_effnet(path: Any, dtype: Any) -> Component:
    if isinstance(path, tuple):
        module, variables = path
        return Component(module, jax.device_put(variables))  # committed arrays (a Component keeps shardings)
    from wurst_jax.weights import load_component

    return Component(*load_component(path, dtype=dtype))


def _encode(variables: Any, images: Any, *, module: Any, size: tuple[int, int]) -> Any:
    from wurst_jax.models.effnet import encode

    return encode(module, variables, images, size)


def encode_images(pipe: Any, image: Any, grid: tuple[int, int]) -> np.ndarray:
    """[B, h, w, 16] semantic latents of the images, seen at 32× the prior's grid (as prepare-data does)."""
    if pipe.effnet is None:
        raise ValueError("image-to-image needs the EfficientNet encoder: call `pipe.load_effnet(folder)` first")
    from wurst_jax.models.effnet import DOWNSCALE

    images = as_images(image)
    size = (grid[0] * DOWNSCALE, grid[1] * DOWNSCALE)
    with pipe.effnet.on_device() as variables:
        out = pipe.compiler("effnet", _encode, {"module": pipe.effnet.module, "size": size}, variables, images)
    c = pipe.prior.module.config.c_in
    if out.shape[-1] != c:
        raise ValueError(f"the EfficientNet encoder gives {out.shape[-1]} channels, the prior works on {c}")
    return np.asarray(jax.device_get(out), np.float32)


def pair(cond: np.ndarray, uncond: Any, emb: np.ndarray, n_per: int) -> tuple[np.ndarray, Any, np.ndarray]:
    """Match prompts and images: one image for every prompt, one per prompt, or one prompt over every image."""
    n, k = cond.shape[0], emb.shape[0]
    if k == 1 or k == n:
        return cond, uncond, np.repeat(emb, n // k, axis=0)
    if k * n_per == n:  # one image per prompt, `num_images_per_prompt` each
        return cond, uncond, np.repeat(emb, n_per, axis=0)
    if n == n_per:  # one prompt over several images
        rep = lambda x: None if x is None else np.tile(x, (k, 1, 1))  # noqa: E731
        return rep(cond), rep(uncond), np.repeat(emb, n_per, axis=0)
    raise ValueError(f"{k} images for {n // n_per} prompts: pass one image, one per prompt, or one prompt")
