"""Stable Cascade blocks that v2 has no counterpart for, NHWC: bilinear `align_corners=True` resizing, the
`UpDownBlock2d` scalers that `switch_level` selects, and the effnet / pixel conditioning mappers.

The ResBlock (`layers.ResBlockStageB`: depthwise conv, LayerNorm, then the skip concatenated), the AttnBlock and
the TimestepBlock (with `conds`) are shared with v2 in `models/layers.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.models.layers import conv, gelu, layer_norm

_F32 = np.float32


@functools.lru_cache(maxsize=256)
def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, lambda) of PyTorch's bilinear align_corners=True resize along one axis, in its float32 arithmetic:
    source = o · (in - 1) / (out - 1), out[o] = x[i0] · (1 - lambda) + x[i1] · lambda."""
    scale = _F32(in_size - 1) / _F32(out_size - 1) if out_size > 1 else _F32(0.0)
    src = (scale * np.arange(out_size, dtype=_F32)).astype(_F32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(_F32), _F32(0.0), _F32(1.0)).astype(_F32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam


def _resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:  # identity, as torch's weights give exactly
        return x
    i0, i1, lam = _linear_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    lam = jnp.asarray(lam).reshape(shape)
    return jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] → [B, h, w, C] float32, torch's `interpolate(mode="bilinear", align_corners=True)`.

    Two taps per axis gathered and blended (exact on every backend, unlike a matmul at default precision); the
    width axis first, as torch's kernel nests it innermost.
    """
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize_bilinear: the target size must be positive, got {size}")
    y = x.astype(jnp.float32)
    return _resize_axis(_resize_axis(y, 2, w), 1, h)


class UpDownBlock2d(nn.Module):
    """diffusers `UpDownBlock2d`: a 1×1 conv plus (if `enabled`) a bilinear ×2 / ×½ resize with
    align_corners=True. Up resizes first (conv `blocks_1`), down maps first (conv `blocks_0`); the resize runs in
    float32."""

    features: int
    mode: str
    enabled: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d.mode must be 'up' or 'down', got {self.mode!r}")
        up = self.mode == "up"
        _, h, w, _ = x.shape
        if up and self.enabled:
            x = resize_bilinear(x, (2 * h, 2 * w)).astype(self.dtype)
        x = conv(self.features, 1, "blocks_1" if up else "blocks_0", self.dtype, self.param_dtype)(x)
        if not up and self.enabled:  # torch's output size for scale_factor 0.5 is floor(size / 2)
            x = resize_bilinear(x, (h // 2, w // 2)).astype(self.dtype)
        return x


def conv_mapper(x: jax.Array, prefix: str, c: int, dtype: Any, param_dtype: Any) -> jax.Array:
    """The effnet / pixels mapper `Sequential(Conv 1×1 → 4c, GELU, Conv 1×1 → c, LayerNorm)`, whose convs are the
    parent's children `{prefix}_0` and `{prefix}_2` — called inside a compact module."""
    x = gelu(conv(4 * c, 1, f"{prefix}_0", dtype, param_dtype)(x.astype(dtype)))
    return layer_norm(conv(c, 1, f"{prefix}_2", dtype, param_dtype)(x))
