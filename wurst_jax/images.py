"""Image files → arrays, as the Würstchen training scripts read them (prepare-data; image-to-image and variation
inputs read the same way).

`load_image` turns an image upright (its EXIF orientation), resizes it so its shorter side is `resolution`
(antialiased bilinear, PIL) and centre-crops it to `resolution`² — diffusers' Würstchen training scripts'
`Resize` + `CenterCrop`. A file that is not a readable image raises one ValueError naming it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """An image file → uint8 [resolution, resolution, 3] RGB: upright, shorter side resized, centre-cropped."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            im = im.resize(size, Image.Resampling.BILINEAR)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            return np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    except Image.DecompressionBombError as e:  # Pillow's guard against huge images: not an exception for users
        raise ValueError(f"{path}: image too large to read safely ({' '.join(str(e).split())})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
