"""Images → CLIP vision input [B, S, S, 3] float32, equal to transformers' `CLIPImageProcessor`.

Stable Cascade's `feature_extractor` config (the defaults here): convert to RGB (transparency composited onto
white), resize the shortest edge to 224 with antialiased bicubic, center-crop 224 × 224, rescale by 1/255 and
normalise with OpenAI's CLIP mean / std. `ImageProcessorConfig.from_dict` reads another folder's
preprocessor_config.json (mean, std, size / crop_size, bilinear or bicubic resample, crop or not).

In transformers 5 `CLIPImageProcessor` is the torchvision backend, which is what diffusers' Stable Cascade
pipelines load; on the CPU its uint8 bicubic / bilinear resize is torch's Pillow-SIMD port: separable passes
(horizontal, then vertical) with int16 fixed-point weights, rounded back to uint8 after each pass. That arithmetic
is reproduced here with numpy, so the output matches it exactly (no torch, torchvision or transformers at run
time). Pillow's own resize (transformers' `CLIPImageProcessorPil`) rounds differently and differs by a grey level
in some pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
_MAX_PRECISION = 22  # torch searches the fixed-point precision of its int16 weights below this many bits


RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's resampling codes that transformers' config files store


def _hw(value: Any, key: str) -> tuple[int, int] | int:
    """A `size` / `crop_size` entry → (height, width), or the int of {"shortest_edge": n} (an int means that too
    for `size`, a square for `crop_size`)."""
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
        if set(value) == {"height", "width"}:
            return int(value["height"]), int(value["width"])
        raise ValueError(f"`{key}` {value}: expected {{'shortest_edge': n}} or {{'height': h, 'width': w}}")
    if isinstance(value, int) and not isinstance(value, bool):
        return value if key == "size" else (value, value)
    raise ValueError(f"`{key}` {value!r}: expected an int or a dict")


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The `CLIPImageProcessor` settings that change pixels; field names are preprocessor_config.json's keys.
    `size` is a shortest edge (int) or (height, width); `crop_size` is (height, width)."""

    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = 3
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = RESCALE_FACTOR
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dict(cls, raw: dict) -> ImageProcessorConfig:
        """A preprocessor_config.json's dict (unknown keys ignored, missing ones CLIPImageProcessor's defaults);
        ValueError naming the key for values that cannot be reproduced exactly."""
        kw: dict[str, Any] = {
            k: raw[k] for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if k in raw
        }
        for key in kw:
            if not isinstance(kw[key], bool):
                raise ValueError(f"`{key}` must be true or false, got {kw[key]!r}")
        if raw.get("size") is not None:
            kw["size"] = _hw(raw["size"], "size")
        if raw.get("crop_size") is not None:
            kw["crop_size"] = _hw(raw["crop_size"], "crop_size")
        if "resample" in raw:
            if raw["resample"] not in RESAMPLE:
                names = ", ".join(f"{k} ({v})" for k, v in RESAMPLE.items())
                raise ValueError(f"`resample` {raw['resample']!r} is not supported; expected {names}")
            kw["resample"] = raw["resample"]
        if "rescale_factor" in raw:
            kw["rescale_factor"] = float(raw["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in raw:
                value = raw[key]
                value = [value] * 3 if isinstance(value, (int, float)) else value
                if not isinstance(value, (list, tuple)) or len(value) != 3:
                    raise ValueError(f"`{key}` must be a number or 3 numbers (R, G, B), got {raw[key]!r}")
                kw[key] = tuple(float(v) for v in value)
        return cls(**kw)

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None when it depends on the image (no crop)."""
        if self.do_center_crop:
            return self.crop_size
        return self.size if self.do_resize and isinstance(self.size, tuple) else None


def preprocess(
    images: Any, size: int = 224, crop_size: int = 224, config: ImageProcessorConfig | None = None
) -> np.ndarray:
    """PIL images or uint8 arrays ([H, W], [H, W, 1|3|4]), one or a list, → [B, h, w, 3] float32: as `config`
    says, else CLIP's defaults with a `size` shortest edge and a square `crop_size` crop."""
    if config is None:
        config = ImageProcessorConfig(size=size, crop_size=(crop_size, crop_size))
    if _is_single(images):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess: no images given")
    out = []
    for i, im in enumerate(images):
        x = _to_rgb(im, i)
        if config.do_resize:
            x = _resize(x, config.size, RESAMPLE[config.resample])
        if config.do_center_crop:
            x = _center_crop(x, *config.crop_size)
        out.append(_normalize(x, config))
    if len({x.shape for x in out}) > 1:
        raise ValueError(f"preprocess: images of different sizes {sorted({x.shape[:2] for x in out})} (no crop)")
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


def _resize(image: np.ndarray, size: int | tuple[int, int], kernel: str) -> np.ndarray:
    """To (height, width), or the shortest edge to `size` keeping the aspect ratio; horizontal pass first (torch)."""
    h, w = image.shape[:2]
    if isinstance(size, tuple):
        new_h, new_w = size
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # transformers' get_resize_output_image_size: truncated
        new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    if new_w != w:
        image = _resample_axis(image, new_w, 1, kernel)
    if new_h != h:
        image = _resample_axis(image, new_h, 0, kernel)
    return image


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (Pillow's and torch's antialiased BICUBIC)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    """The triangle filter (torch's antialiased BILINEAR)."""
    return np.maximum(1.0 - np.abs(x), 0.0)


_KERNELS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}  # filter, half its support at scale 1


def _int16_weights(n_in: int, n_out: int, kernel: str = "bicubic") -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index [n_out], int16 weights [n_out, K] (0 past each window), precision bits).

    Float64 weights of the antialiased filter (support widened by the downscale factor), normalised per output,
    then scaled by the largest power of two that keeps every weight inside int16 and rounded half away from 0.
    """
    fn, half = _KERNELS[kernel]
    scale = n_in / n_out
    support = half * scale if scale >= 1 else half
    inv = 1 / scale if scale >= 1 else 1.0
    k = int(np.ceil(support)) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in)
    taps = np.arange(k)
    valid = taps[None] < (stop - start)[:, None]
    w = np.where(valid, fn((start[:, None] + taps[None] - center[:, None] + 0.5) * inv), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1), w)
    w_max = w.max()
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    iw = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return start, iw, precision


def _resample_axis(image: np.ndarray, n_out: int, axis: int, kernel: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, C] resized along `axis` with integer arithmetic, saturated back to uint8."""
    # int32 as torch: Σ|w| ≈ 1.2 · 2**precision ≤ 1.2 · 2**22, so 255 × that cannot overflow
    x = np.moveaxis(image, axis, 0).astype(np.int32)  # [N_in, M, C]
    start, w, precision = _int16_weights(x.shape[0], n_out, kernel)
    acc = np.full((n_out, *x.shape[1:]), 1 << (precision - 1), np.int32)  # + 0.5 in fixed point: rounds
    for k in range(w.shape[1]):  # one tap at a time: memory stays [N_out, M, C] for any downscale factor
        acc += w[:, k, None, None] * x[np.minimum(start + k, x.shape[0] - 1)]  # clipped taps have weight 0
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < crop_h or w < crop_w:  # only reachable with crop_size > size: zero padding as transformers does
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        image = np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int((h - crop_h) / 2.0), int((w - crop_w) / 2.0)
    return image[top : top + crop_h, left : left + crop_w]


def _normalize(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """(x - mean/r) / (std/r) in float32 for rescale factor r: transformers folds the rescale into mean and std
    this way when it does both; rescale alone is x · r."""
    x = image.astype(np.float32)
    if config.do_normalize:
        mean, std = np.asarray(config.image_mean, np.float32), np.asarray(config.image_std, np.float32)
        if config.do_rescale:
            mean, std = mean * np.float32(1 / config.rescale_factor), std * np.float32(1 / config.rescale_factor)
        return (x - mean) / std
    return x * np.float32(config.rescale_factor) if config.do_rescale else x
