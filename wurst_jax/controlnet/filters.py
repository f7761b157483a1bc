"""The ControlNet condition filters of the original Stable Cascade (`modules/controlnet.py`), computed once per
image: Canny edges (OpenCV's `cv2.Canny`, the `opencv-python-headless` wheel, on the host), inpainting /
outpainting conditions from an image and a mask (NumPy, on the host) and the super-resolution condition (nearest
downscale, the EfficientNet encoder on the device, nearest upscale).

Images are [B, H, W, 3] RGB, uint8 or float in [0, 1] (a float array is used as is, as the original's
`ToTensor()` output); conditions come back float32 [B, H', W', C] for `StableCascadeControlNet`.
Masks are bool [B, H, W]: True where the image is to be generated (inpainted / outpainted), False where it is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

_F32 = np.float32


def as_float_images(images: Any) -> np.ndarray:
    """[B, H, W, 3] (or one [H, W, 3]) uint8 or float → float32 [B, H, W, 3] in [0, 1] (uint8 divided by 255)."""
    x = np.asarray(images)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] RGB, got shape {x.shape}")
    return x.astype(_F32) / _F32(255) if np.issubdtype(x.dtype, np.integer) else x.astype(_F32)


# ---------------------------------------------------------------------------------------------------------------
# torch's bilinear resize (align_corners=False, no antialias), as the original's Canny filter calls it


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a·b + c rounded once to float32 (through float64: the product of two float32 is exact there)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(_F32)


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, l0, l1) along one axis as torch computes them: src = max(scale·(o + ½) - ½, 0) with
    scale = in / out in float32, i0 = floor(src), i1 = i0 + 1 (clamped), l1 = src - i0, l0 = 1 - l1."""
    scale = _F32(in_size) / _F32(out_size)
    o = np.arange(out_size, dtype=_F32) + _F32(0.5)
    src = np.maximum(_fma(np.full_like(o, scale), o, np.full_like(o, -0.5)), _F32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = np.clip(src - i0.astype(_F32), _F32(0), _F32(1)).astype(_F32)
    return i0, i1, (_F32(1) - l1).astype(_F32), l1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [B, H, W, C] → [B, h, w, C], `torch.nn.functional.interpolate(mode="bilinear")` bit for bit as
    torch's x86 CPU kernel computes it (fused multiply-adds: x0·l0 + (x1·l1) rounded once): the width taps
    first, then the height taps. Elsewhere (no FMA) torch may differ in the last bit."""
    h, w = size
    x = np.asarray(x, _F32)
    if x.shape[2] != w:
        i0, i1, l0, l1 = _taps(x.shape[2], w)
        l0, l1 = l0[None, None, :, None], l1[None, None, :, None]
        x = _fma(x[:, :, i0], l0, (x[:, :, i1] * l1).astype(_F32))
    if x.shape[1] != h:
        i0, i1, l0, l1 = _taps(x.shape[1], h)
        l0, l1 = l0[None, :, None, None], l1[None, :, None, None]
        x = _fma(x[:, i0], l0, (x[:, i1] * l1).astype(_F32))
    return x


# ---------------------------------------------------------------------------------------------------------------
# Canny


def canny(images: Any, resize: int | None = 224, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges [B, H, W, 1] float32 in [0, 1], as the original's `CannyFilter`: each image resized bilinearly
    to resize × resize (None: kept), scaled to 0..255 and truncated to uint8, `cv2.Canny(rgb, low, high)` (the
    largest gradient over the three channels), divided by 255 and resized back to H × W."""
    try:
        import cv2
    except ImportError as e:  # an optional dependency: only this filter needs it
        raise ImportError("the Canny filter needs OpenCV: pip install 'wurst-jax[controlnet]'") from e
    x = as_float_images(images)
    size = x.shape[1:3]
    if resize is not None:
        x = resize_bilinear(x, (resize, resize))
    edges = np.stack([cv2.Canny((img * _F32(255)).astype(np.uint8), low, high) for img in x])
    edges = (edges.astype(_F32) / _F32(255))[..., None]
    return resize_bilinear(edges, size) if resize is not None else edges


# ---------------------------------------------------------------------------------------------------------------
# inpainting / outpainting


def as_mask(mask: Any, size: tuple[int, int], batch: int) -> np.ndarray:
    """A mask [B, H, W] / [B, H, W, 1] / [H, W] (bool, or numbers: > 0.5 is masked) → bool [batch, H, W]."""
    m = np.asarray(mask)
    m = m[..., 0] if m.ndim in (3, 4) and m.shape[-1] == 1 else m
    m = m[None] if m.ndim == 2 else m
    if m.ndim != 3 or m.shape[1:] != tuple(size) or m.shape[0] not in (1, batch):
        raise ValueError(f"the mask must be [{batch} or 1, {size[0]}, {size[1]}], got shape {np.shape(mask)}")
    m = m if m.dtype == bool else m > 0.5
    return np.broadcast_to(m, (batch, *size))


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A mask image (white or bright = to generate) → bool [1, H, W] at `size` (nearest resize if it differs)."""
    from PIL import Image

    path = Path(path)
    try:
        img = Image.open(path).convert("L")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable mask image ({e})") from e
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.NEAREST)
    return (np.asarray(img) > 127)[None]


def outpaint_mask(size: tuple[int, int], box: Sequence[int]) -> np.ndarray:
    """bool [1, H, W]: True outside `box` = (left, top, right, bottom) in pixels (the kept region), for
    outpainting; the box must lie inside the image and be non-empty."""
    h, w = size
    left, top, right, bottom = (int(v) for v in box)
    if not (0 <= left < right <= w and 0 <= top < bottom <= h):
        raise ValueError(f"the outpainting box (left, top, right, bottom) must lie inside {w}x{h}, got {tuple(box)}")
    mask = np.ones((1, h, w), bool)
    mask[:, top:bottom, left:right] = False
    return mask


def inpaint(images: Any, mask: Any) -> np.ndarray:
    """The original's `InpaintFilter` with a given mask: [B, H, W, 4] float32 = the image with its masked pixels
    set to 1 (white), and the mask as a fourth channel (1 where masked)."""
    x = as_float_images(images)
    m = as_mask(mask, x.shape[1:3], x.shape[0])[..., None]
    return np.concatenate([np.where(m, _F32(1), x), m.astype(_F32)], axis=-1)


def composite(original: Any, generated: Any, mask: Any) -> np.ndarray:
    """[B, H, W, 3] float32: `generated` where the mask is set, `original` elsewhere (the unmasked region kept
    exactly). Both image arrays as `as_float_images` reads them, at the same size."""
    a, b = as_float_images(original), as_float_images(generated)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"original {a.shape} and generated {b.shape} images must have the same size")
    m = as_mask(mask, a.shape[1:3], max(a.shape[0], b.shape[0]))[..., None]
    return np.where(m, b, a)


# ---------------------------------------------------------------------------------------------------------------
# super-resolution


def nearest_indices(in_size: int, scale: float) -> np.ndarray:
    """torch's `interpolate(mode="nearest", scale_factor=scale)` along one axis: out = floor(in · scale) entries,
    out[o] = in[min(floor(o · (1 / scale)), in - 1)] (doubling: o >> 1), in float32."""
    out = int(np.floor(in_size * scale))
    if out < 1:
        raise ValueError(f"nearest resize by {scale} of a side of {in_size} leaves nothing")
    if out == 2 * in_size:
        return np.arange(out) >> 1
    src = np.floor(np.arange(out, dtype=_F32) * _F32(1.0 / scale)).astype(np.int64)
    return np.minimum(src, in_size - 1)


def super_resolution(effnet: Any, effnet_variables: Any, images: Any, scale: float = 0.5) -> tuple[Any, Any]:
    """The original's `SREffnetFilter`: images [B, H, W, 3] in [0, 1] → (condition [B, h, w, 16] float32, the
    low-resolution preview [B, H', W', 3]). The images are downscaled by `scale` (nearest), normalised (ImageNet
    mean / std) and encoded by `effnet` (Stable Cascade's `EfficientNetEncoder`, `mapper_affine=False`) at that
    size; the embedding and the small image are then upscaled by 1 / scale (nearest). Runs on the device, as one
    compiled function per module and image size (jitted: the encoder op by op is slow)."""
    import jax.numpy as jnp

    x = jnp.asarray(as_float_images(images) if not hasattr(images, "devices") else images, jnp.float32)
    return _super_resolution(effnet, float(scale), effnet_variables, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _super_resolution(effnet: Any, scale: float, effnet_variables: Any, x: Any) -> tuple[Any, Any]:
    import jax.numpy as jnp

    from wurst_jax.models.effnet import normalize

    up = 1.0 / scale

    def nearest(a: Any, factor: float) -> Any:
        a = jnp.take(a, nearest_indices(a.shape[1], factor), axis=1)
        return jnp.take(a, nearest_indices(a.shape[2], factor), axis=2)

    small = nearest(x, scale)
    embedding = effnet.apply(effnet_variables, normalize(small)).astype(jnp.float32)
    return nearest(embedding, up), nearest(small, up)
