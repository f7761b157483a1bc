"""Stage A, the Paella VQGAN (`PaellaVQModel`), in NHWC: pixels [B, H, W, 3] ↔ latents [B, H/4, W/4, 4].

`encode` ends in a 1×1 conv and BatchNorm (inference: running statistics from the `batch_stats` collection);
`decode` skips quantisation by default, as diffusers' `force_not_quantize=True`; `quantize` snaps latents to
the nearest codebook vector (Euclidean distance, as diffusers' `VectorQuantizer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import EMBED, conv, conv_transpose, dense, gelu, layer_norm, pixel_shuffle, pixel_unshuffle


@dataclasses.dataclass(frozen=True)
class StageAConfig:
    """Hyper-parameters of `PaellaVQModel`; field names are diffusers' config keys."""

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    @classmethod
    def v2(cls) -> StageAConfig:
        """The released Würstchen v2 VQGAN (18,406,894 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> StageAConfig:
        return cls(bottleneck_blocks=2, embed_dim=16, num_vq_embeddings=64)

    @property
    def c_levels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim // 2**i for i in reversed(range(self.levels)))


class MixingResidualBlock(nn.Module):
    """Depthwise (replicate-padded) and channelwise residual mixing, modulated by six learned `gammas`."""

    c: int
    embed_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        mods = self.param("gammas", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (6,), pdt)
        mods = mods.astype(dt)
        h = layer_norm(x) * (1 + mods[0]) + mods[1]
        h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = x + conv(self.c, 3, "depthwise_1", dt, pdt, groups=self.c)(h) * mods[2]
        h = layer_norm(x) * (1 + mods[3]) + mods[4]
        h = dense(self.c, "channelwise_2", dt, pdt, axes=("mlp", EMBED))(
            gelu(dense(self.embed_dim, "channelwise_0", dt, pdt)(h))
        )
        return x + h * mods[5]


class VectorQuantizer(nn.Module):
    """diffusers' `VectorQuantizer` at inference: nearest codebook entry by Euclidean distance."""

    num_embeddings: int
    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        init = nn.with_logical_partitioning(nn.initializers.uniform(2.0 / self.num_embeddings), (None, None))
        embed = nn.Embed(self.num_embeddings, self.dim, jnp.float32, self.param_dtype, init, name="embedding")
        codebook = embed.embedding.astype(jnp.float32)
        z32 = z.astype(jnp.float32)
        dist = (
            jnp.sum(z32**2, axis=-1, keepdims=True)
            - 2 * jnp.einsum("bhwc,kc->bhwk", z32, codebook, precision=jax.lax.Precision.HIGHEST)
            + jnp.sum(codebook**2, axis=-1)
        )
        idx = jnp.argmin(dist, axis=-1)
        z_q = codebook[idx]
        return (z32 + jax.lax.stop_gradient(z_q - z32)).astype(z.dtype), idx


class PaellaVQModel(nn.Module):
    """`encode`, `quantize`, `decode`; `__call__` = encode → decode (used for init and the reconstruction loss)."""

    config: StageAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        c = cfg.c_levels
        self.in_block_1 = conv(c[0], 1, "in_block_1", dt, pdt)
        down = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(conv(c[i], 4, f"down_blocks_{len(down)}", dt, pdt, stride=2, padding=1))
            down.append(MixingResidualBlock(c[i], c[i] * 4, dt, pdt, name=f"down_blocks_{len(down)}"))
        self.down = down
        n = len(down)
        self.down_out_conv = conv(cfg.latent_channels, 1, f"down_blocks_{n}_0", dt, pdt, use_bias=False)
        self.down_out_norm = nn.BatchNorm(
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=pdt,
            name=f"down_blocks_{n}_1",
        )
        self.vquantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels, pdt, name="vquantizer")
        up = []
        self.up_in = conv(c[-1], 1, "up_blocks_0_0", dt, pdt)
        for i in range(cfg.levels):
            ci = c[cfg.levels - 1 - i]
            for _ in range(cfg.bottleneck_blocks if i == 0 else 1):
                up.append(MixingResidualBlock(ci, ci * 4, dt, pdt, name=f"up_blocks_{len(up) + 1}"))
            if i < cfg.levels - 1:
                co = c[cfg.levels - 2 - i]
                up.append(conv_transpose(co, 4, 2, 1, f"up_blocks_{len(up) + 1}", dt, pdt))
        self.up = up
        factor = cfg.up_down_scale_factor
        self.out_block_0 = conv(cfg.out_channels * factor**2, 1, "out_block_0", dt, pdt)

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images [B, H, W, in_channels] in [0, 1] → unquantised latents [B, H/4, W/4, latent_channels].

        `train=True` normalises with batch statistics and updates `batch_stats` (apply with mutable=["batch_stats"]).
        """
        h = self.in_block_1(pixel_unshuffle(x.astype(self.dtype), self.config.up_down_scale_factor))
        for block in self.down:
            h = block(h)
        return self.down_out_norm(self.down_out_conv(h), use_running_average=not train).astype(x.dtype)

    def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Nearest codebook vectors (straight-through gradient) and their indices [B, h, w]."""
        return self.vquantizer(z)

    def decode(self, h: jax.Array, force_not_quantize: bool = True) -> jax.Array:
        """Latents [B, h, w, latent_channels] → images [B, 4h, 4w, out_channels] (not clamped)."""
        if not force_not_quantize:
            h, _ = self.quantize(h)
        x = self.up_in(h.astype(self.dtype))
        for block in self.up:
            x = block(x)
        return pixel_shuffle(self.out_block_0(x), self.config.up_down_scale_factor).astype(h.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x), force_not_quantize=False)
