"""A small semantic encoder: the role EfficientNet plays for Würstchen, trained jointly with Stage B (as v1 did).

images [B, H, W, 3] in [0, 1] → semantic latents [B, H/2^n, W/2^n, c_out] (n = len(widths)), standardised
over channels so the prior's target has unit scale.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import conv, gelu, layer_norm


class SemanticEncoder(nn.Module):
    c_out: int = 16
    widths: tuple[int, ...] = (32, 64, 96, 128)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype) * 2 - 1
        for i, w in enumerate(self.widths):
            x = conv(w, 3, f"down_{i}", self.dtype, self.param_dtype, stride=2, padding=1)(x)
            x = gelu(layer_norm(x))
            x = x + conv(w, 3, f"mix_{i}", self.dtype, self.param_dtype, padding=1)(gelu(x))
        return layer_norm(conv(self.c_out, 1, "out", self.dtype, self.param_dtype)(x)).astype(jnp.float32)
