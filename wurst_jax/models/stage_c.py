"""Stage C, the text-conditional prior (`WuerstchenPrior`), in NHWC.

Denoises the 16-channel semantic latents ([B, h, w, 16], h = ceil(H / 42.67)) conditioned on the
CLIP ViT-bigG text states [B, 77, 1280] and the noise ratio r [B].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import AttnBlock, ResBlock, TimestepBlock, conv, dense, layer_norm, timestep_embedding


@dataclasses.dataclass(frozen=True)
class StageCConfig:
    """Hyper-parameters of `WuerstchenPrior`; field names are diffusers' config keys."""

    c_in: int = 16
    c: int = 1536
    c_cond: int = 1280
    c_r: int = 64
    depth: int = 32
    nhead: int = 24
    dropout: float = 0.1

    @classmethod
    def v2(cls) -> StageCConfig:
        """The released Würstchen v2 prior (993,636,896 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> StageCConfig:
        return cls(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=2, dropout=0.0)


class WuerstchenPrior(nn.Module):
    """x [B, h, w, c_in], r [B], c [B, T, c_cond] → predicted noise [B, h, w, c_in]."""

    config: StageCConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, r: jax.Array, c: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x_in = x
        x = conv(cfg.c, 1, "projection", dt, pdt)(x.astype(dt))
        c_embed = dense(cfg.c, "cond_mapper_0", dt, pdt)(c.astype(dt))
        c_embed = dense(cfg.c, "cond_mapper_2", dt, pdt)(nn.leaky_relu(c_embed, 0.2))
        r_embed = timestep_embedding(r, cfg.c_r)
        for i in range(cfg.depth):
            x = ResBlock(cfg.c, dropout=cfg.dropout, dtype=dt, param_dtype=pdt, name=f"blocks_{3 * i}")(
                x, deterministic=deterministic
            )
            x = TimestepBlock(cfg.c, dt, pdt, name=f"blocks_{3 * i + 1}")(x, r_embed)
            x = AttnBlock(cfg.c, cfg.c, cfg.nhead, True, cfg.dropout, dt, pdt, name=f"blocks_{3 * i + 2}")(
                x, c_embed, deterministic
            )
        out = conv(cfg.c_in * 2, 1, "out_1", dt, pdt, zero_init=True)(layer_norm(x)).astype(jnp.float32)
        a, b = jnp.split(out, 2, axis=-1)
        return ((x_in.astype(jnp.float32) - a) / (jnp.abs(1 - b) + 1e-5)).astype(x_in.dtype)
