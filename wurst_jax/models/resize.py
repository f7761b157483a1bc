"""Antialiased bicubic resize matching PyTorch's ``align_corners=True`` semantics.

Würstchen Stage B resizes its conditioning latents to each UNet level (up and down) with
``F.interpolate(x, size, mode="bicubic", antialias=True, align_corners=True)``. ``jax.image.resize``
has no ``align_corners`` and a different kernel support, so we rebuild PyTorch's weights. The op is
linear and separable: per axis a float32 ``[out, in]`` matrix is built with numpy at trace time
(static sizes) and applied to ``[B, H, W, C]`` with two einsums.

PyTorch's antialias weights (``UpSampleKernel.cpp`` ``_compute_weights_aa``), checked against torch:
  * ``scale = (in - 1) / (out - 1)`` if ``out > 1`` else ``0``; ``support = 2 * scale`` if
    ``scale >= 1`` else ``2``; filter argument scaled by ``1 / scale`` when ``scale >= 1``;
  * ``center_i = scale * (i + 0.5)``; taps ``j`` in ``[trunc(center - support + 0.5),
    trunc(center + support + 0.5))`` clipped to ``[0, in)`` (edge rows get fewer taps, no padding),
    weight ``cubic((j - center + 0.5) / scale)`` with Keys ``a = -0.5``, renormalised by their sum.
Weights are computed with torch's float32 rounding (incl. FMA), bit-identical on the tested sizes.
``in == out`` gives exactly the identity (verified against torch), so that axis is skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _fma(a, b, c) -> np.ndarray:  # float32 fused multiply-add: exact product in f64, one rounding
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F32)


def _cubic_aa(x: np.ndarray) -> np.ndarray:  # Keys a=-0.5, like torch's float32 ``aa_filter``
    x = np.abs(x.astype(_F32))
    inner = _fma(_fma(1.5, x, -2.5) * x, x, 1.0)  # ((a + 2) x - (a + 3)) x^2 + 1
    outer = _fma(_fma(_fma(-0.5, x, 2.5), x, -4.0), x, 2.0)  # ((a x - 5a) x + 8a) x - 4a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, _F32(0.0))).astype(_F32)


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32 ``[out, in]`` matrix of torch's antialiased bicubic weights (align_corners=True). Read-only."""
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in={in_size}, out={out_size}")
    scale = _F32(in_size - 1) / _F32(out_size - 1) if out_size > 1 else _F32(0.0)
    support = _F32(2.0) * scale if scale >= 1.0 else _F32(2.0)
    invscale = _F32(1.0) / scale if scale >= 1.0 else _F32(1.0)
    center = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(_F32)  # [out]
    xmin = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    width = int(max((xmax - xmin).max(), 1))
    j = xmin[:, None] + np.arange(width)[None, :]  # [out, width]
    valid = j < xmax[:, None]
    arg = (((j.astype(_F32) - center[:, None]).astype(np.float64) + 0.5) * np.float64(invscale)).astype(_F32)
    w = np.where(valid, _cubic_aa(arg), _F32(0.0))

    total = np.zeros(out_size, _F32)
    for k in range(width):  # sequential float32 sum, same order as torch
        total = (total + w[:, k]).astype(_F32)
    w = (w / np.where(total == 0.0, _F32(1.0), total)[:, None]).astype(_F32)  # torch skips when total == 0

    mat = np.zeros((out_size, in_size), _F32)
    rows = np.broadcast_to(np.arange(out_size)[:, None], j.shape)
    mat[rows[valid], j[valid]] = w[valid]
    mat.setflags(write=False)
    return mat


def resize_bicubic_aa(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H_out, W_out, C]`` float32, equal to torch bicubic antialias align_corners=True."""
    (h_out, w_out), (_, h_in, w_in, _) = (int(s) for s in size), x.shape
    y, hp = x.astype(jnp.float32), jax.lax.Precision.HIGHEST
    if h_in != h_out:
        y = jnp.einsum("oh,bhwc->bowc", jnp.asarray(resize_matrix(h_in, h_out)), y, precision=hp)
    if w_in != w_out:
        y = jnp.einsum("pw,bhwc->bhpc", jnp.asarray(resize_matrix(w_in, w_out)), y, precision=hp)
    return y
