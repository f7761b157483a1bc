"""Images → CLIP vision input [B, 224, 224, 3] float32, equal to transformers' `CLIPImageProcessor`.

Stable Cascade's `feature_extractor` config: convert to RGB (transparency composited onto white), resize the
shortest edge to 224 with antialiased bicubic, center-crop 224 × 224, rescale by 1/255 and normalise with OpenAI's
CLIP mean / std. In transformers 5 `CLIPImageProcessor` is the torchvision backend, which is what diffusers' Stable
Cascade pipelines load; on the CPU its uint8 bicubic resize is torch's Pillow-SIMD port: separable passes
(horizontal, then vertical) with int16 fixed-point weights, rounded back to uint8 after each pass. That arithmetic
is reproduced here with numpy, so the output matches it exactly (no torch, torchvision or transformers at run
time). Pillow's own resize (transformers' `CLIPImageProcessorPil`) rounds differently and differs by a grey level
in some pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
_MAX_PRECISION = 22  # torch searches the fixed-point precision of its int16 weights below this many bits


def preprocess(images: Any, size: int = 224, crop_size: int = 224) -> np.ndarray:
    """PIL images or uint8 arrays ([H, W], [H, W, 1|3|4]), one or a list, → [B, crop_size, crop_size, 3] float32."""
    if _is_single(images):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess: no images given")
    out = [
        _normalize(_center_crop(_resize_shortest_edge(_to_rgb(im, i), size), crop_size)) for i, im in enumerate(images)
    ]
    return np.stack(out)


def _is_single(images: Any) -> bool:
    return not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)


def _to_rgb(image: Any, index: int) -> np.ndarray:
    """→ [H, W, 3] uint8, as transformers' `do_convert_rgb` (PIL: `convert`; arrays: repeat grey, blend alpha)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image {index}: expected a PIL image or a uint8 array, got an array of {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"image {index}: expected [H, W] or [H, W, 1|3|4] (channels last), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        # torchvision's to_dtype in float32: x / 255, blend onto white, then × 255.999 truncated (not rounded)
        x = arr.astype(np.float32) * np.float32(1 / 255)
        rgb, alpha = x[..., :3], x[..., 3:]
        blended = rgb * alpha + (np.float32(1) - alpha)
        return (blended * np.float32(255 + 1 - 1e-3)).astype(np.uint8)
    return arr


def _resize_shortest_edge(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # transformers' get_resize_output_image_size: truncated
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    if new_w != w:
        image = _resample_axis(image, new_w, axis=1)
    if new_h != h:
        image = _resample_axis(image, new_h, axis=0)
    return image


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's and torch's antialiased BICUBIC)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _int16_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index [n_out], int16 weights [n_out, K] (0 past each window), precision bits).

    Float64 weights of the antialiased filter (support widened by the downscale factor), normalised per output,
    then scaled by the largest power of two that keeps every weight inside int16 and rounded half away from 0.
    """
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1 / scale if scale >= 1 else 1.0
    k = int(np.ceil(support)) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in)
    taps = np.arange(k)
    valid = taps[None] < (stop - start)[:, None]
    w = np.where(valid, _bicubic((start[:, None] + taps[None] - center[:, None] + 0.5) * inv), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1), w)
    w_max = w.max()
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    iw = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return start, iw, precision


def _resample_axis(image: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """uint8 [H, W, C] resized along `axis` with integer arithmetic, saturated back to uint8."""
    # int32 as torch: Σ|w| ≈ 1.2 · 2**precision ≤ 1.2 · 2**22, so 255 × that cannot overflow
    x = np.moveaxis(image, axis, 0).astype(np.int32)  # [N_in, M, C]
    start, w, precision = _int16_weights(x.shape[0], n_out)
    acc = np.full((n_out, *x.shape[1:]), 1 << (precision - 1), np.int32)  # + 0.5 in fixed point: rounds
    for k in range(w.shape[1]):  # one tap at a time: memory stays [N_out, M, C] for any downscale factor
        acc += w[:, k, None, None] * x[np.minimum(start + k, x.shape[0] - 1)]  # clipped taps have weight 0
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def _center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < crop or w < crop:  # only reachable with crop_size > size: zero padding as transformers does
        pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
        image = np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int((h - crop) / 2.0), int((w - crop) / 2.0)
    return image[top : top + crop, left : left + crop]


def _normalize(image: np.ndarray) -> np.ndarray:
    """(x - 255·mean) / (255·std) in float32: transformers folds the 1/255 rescale into mean and std this way."""
    mean = np.asarray(CLIP_MEAN, np.float32) * np.float32(1 / RESCALE_FACTOR)
    std = np.asarray(CLIP_STD, np.float32) * np.float32(1 / RESCALE_FACTOR)
    return (image.astype(np.float32) - mean) / std
