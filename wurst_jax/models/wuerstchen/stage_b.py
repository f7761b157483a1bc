"""Stage B, the diffusion decoder (`WuerstchenDiffNeXt`), in NHWC.

A U-Net over Stage A latents [B, H, W, 4] conditioned on the Stage C latents ("effnet", [B, h, w, 16],
resized to every level with PyTorch's antialiased align-corners bicubic), CLIP ViT-H text states
[B, 77, 1024] and the noise ratio r [B].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import (
    AttnBlock,
    ResBlockStageB,
    TimestepBlock,
    conv,
    conv_transpose,
    dense,
    layer_norm,
    pixel_shuffle,
    pixel_unshuffle,
    timestep_embedding,
)
from wurst_jax.models.repeat import apply_repeats
from wurst_jax.models.resize import resize_bicubic_aa


@dataclasses.dataclass(frozen=True)
class StageBConfig:
    """Hyper-parameters of `WuerstchenDiffNeXt`; field names are diffusers' config keys."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, 10, 20, 20)
    blocks: tuple[int, ...] = (4, 4, 14, 4)
    level_config: tuple[str, ...] = ("CT", "CTA", "CTA", "CTA")
    inject_effnet: tuple[bool, ...] = (False, True, True, True)
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = 0.1

    def __post_init__(self):
        n = len(self.c_hidden)
        for field in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"StageBConfig.{field} needs {n} entries (one per c_hidden level)")
        if not isinstance(self.dropout, (int, float)) and len(self.dropout) != n:
            raise ValueError(f"StageBConfig.dropout needs one value or {n}")
        for level, cfg in enumerate(self.level_config):
            if set(cfg) - set("CTA"):
                raise ValueError(f"StageBConfig.level_config[{level}]={cfg!r}: block types are C, T and A")

    @classmethod
    def v2(cls) -> StageBConfig:
        """The released Würstchen v2 decoder (1,055,365,280 parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> StageBConfig:
        return cls(
            c_r=8,
            c_cond=32,
            c_hidden=(8, 16, 24, 24),
            nhead=(-1, 2, 2, 2),
            blocks=(1, 1, 2, 1),
            effnet_embd=16,
            clip_embd=24,
            dropout=0.0,
        )

    @property
    def level_dropout(self) -> tuple[float, ...]:
        if isinstance(self.dropout, (int, float)):
            return (float(self.dropout),) * len(self.c_hidden)
        return tuple(self.dropout)

    @property
    def downscale(self) -> int:
        """Latent sizes must be multiples of this: patch_size · 2^(levels - 1)."""
        return self.patch_size * 2 ** (len(self.c_hidden) - 1)


class WuerstchenDiffNeXt(nn.Module):
    """x [B, H, W, c_in], r [B], effnet [B, h, w, effnet_embd], clip [B, T, clip_embd] → noise [B, H, W, c_out].

    Each level repeats its `level_config` sequence `blocks[level]` times (v2's third level: 14 × CTA on the way
    down and up). `scan_blocks` runs a level's identical repeats as one `jax.lax.scan` and `remat` recomputes
    each repeat in the backward pass (`models/repeat.py`); the first repeat of an up level, which also takes the
    level's skip connection, runs on its own. The parameter tree and names stay diffusers' whatever the options.
    """

    config: StageBConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_blocks: bool = False
    remat: bool = False
    stream_blocks: bool = False  # sequential offload: the scanned repeats' parameters stay in host memory

    def _repeat_names(self) -> dict[tuple[str, int], list[list[str]]]:
        """(down|up, level) → the names of each repeat that `apply_repeats` runs (the functional path)."""
        cfg, n, out = self.config, len(self.config.c_hidden), {}
        for i in range(n):
            kinds, j = cfg.level_config[i], 1 if i > 0 else 0
            out["down", i] = [[f"down_blocks_{i}_{j + r * len(kinds) + k}" for k in range(len(kinds))]
                              for r in range(cfg.blocks[i])]  # fmt: skip
        for u in range(n):
            i, own = n - 1 - u, 1 if u > 0 else 0  # an up level's first repeat takes the skip: run on its own
            kinds = cfg.level_config[i]
            out["up", i] = [[f"up_blocks_{u}_{r * len(kinds) + k}" for k in range(len(kinds))]
                            for r in range(own, cfg.blocks[i])]  # fmt: skip
        return out

    def streamed_names(self) -> tuple[str, ...]:
        """The top-level parameter names `stream_blocks` moves to the device itself, one repeat at a time."""
        if not self.stream_blocks:
            return ()
        return tuple(name for reps in self._repeat_names().values() for rep in reps for name in rep)

    def _block(self, kind: str, level: int, c_skip: int, name: str | None) -> nn.Module:
        """The child `name`, or with `name` None an unbound block to `apply` (the repeats' functional path)."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        c, drop = cfg.c_hidden[level], cfg.level_dropout[level]
        kw = dict(name=name) if name is not None else dict(parent=None)
        if kind == "C":
            return ResBlockStageB(c, c_skip, cfg.kernel_size, drop, dt, pdt, **kw)
        if kind == "A":
            return AttnBlock(c, cfg.c_cond, cfg.nhead[level], True, drop, dt, pdt, **kw)
        return TimestepBlock(c, dt, pdt, **kw)

    def _effnet(self, effnet: jax.Array, index: int, size: tuple[int, int]) -> jax.Array:
        resized = resize_bicubic_aa(effnet, size).astype(self.dtype)
        return conv(self.config.c_cond, 1, f"effnet_mappers_{index}", self.dtype, self.param_dtype)(resized)

    @nn.compact
    def __call__(
        self, x: jax.Array, r: jax.Array, effnet: jax.Array, clip: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        n = len(cfg.c_hidden)
        r_embed = timestep_embedding(r, cfg.c_r)
        clip = layer_norm(dense(cfg.c_cond, "clip_mapper", dt, pdt)(clip.astype(dt)))
        x_in = x
        x = pixel_unshuffle(x.astype(dt), cfg.patch_size)
        x = layer_norm(conv(cfg.c_hidden[0], 1, "embedding_1", dt, pdt)(x))
        effnet_skip = lambda level: cfg.c_cond if cfg.inject_effnet[level] else 0  # noqa: E731  (channels)

        def args(block, skip) -> tuple:  # each block's inputs after x
            if isinstance(block, ResBlockStageB):
                return skip, deterministic
            return (clip, deterministic) if isinstance(block, AttnBlock) else (r_embed,)

        def run(block, x, skip):
            return block(x, *args(block, skip))

        functional = (self.scan_blocks or self.remat or self.stream_blocks) and not self.is_initializing()

        def repeats(x, level, prefix, j, reps, skip):
            """Repeats `reps` of `level` (children `prefix_{j}` on) through `apply_repeats`."""
            kinds = cfg.level_config[level]
            blocks = [self._block(kind, level, effnet_skip(level), None) for kind in kinds]
            names = [[f"{prefix}_{j + r * len(kinds) + k}" for k in range(len(kinds))] for r in range(len(reps))]
            kw = dict(scan=self.scan_blocks, remat=self.remat, deterministic=deterministic, stream=self.stream_blocks)
            return apply_repeats(self, x, names, blocks, lambda block: args(block, skip), **kw)

        level_outputs = []
        for i in range(n):
            j = 0
            if i > 0:
                x = conv(cfg.c_hidden[i], 2, f"down_blocks_{i}_0_1", dt, pdt, stride=2)(layer_norm(x))
                j = 1
            effnet_c = self._effnet(effnet, i, x.shape[1:3]) if cfg.inject_effnet[i] else None
            if functional:
                x = repeats(x, i, f"down_blocks_{i}", j, range(cfg.blocks[i]), effnet_c)
            else:
                for _ in range(cfg.blocks[i]):
                    for kind in cfg.level_config[i]:
                        x = run(self._block(kind, i, effnet_skip(i), f"down_blocks_{i}_{j}"), x, effnet_c)
                        j += 1
            level_outputs.insert(0, x)

        x = level_outputs[0]
        for u in range(n):
            i = n - 1 - u
            effnet_c = self._effnet(effnet, n + u, x.shape[1:3]) if cfg.inject_effnet[i] else None
            j = 0
            own = cfg.blocks[i] if not functional else 1 if u > 0 else 0  # repeats run on their own, from 0
            for rep in range(own):
                for k, kind in enumerate(cfg.level_config[i]):
                    first = u > 0 and rep == 0 and k == 0
                    c_skip = (cfg.c_hidden[i] if first else 0) + effnet_skip(i)
                    skips = ([level_outputs[u]] if first else []) + ([effnet_c] if effnet_c is not None else [])
                    skip = jnp.concatenate(skips, axis=-1) if skips else None
                    x = run(self._block(kind, i, c_skip, f"up_blocks_{u}_{j}"), x, skip)
                    j += 1
            if own < cfg.blocks[i]:
                x = repeats(x, i, f"up_blocks_{u}", j, range(own, cfg.blocks[i]), effnet_c)
                j += (cfg.blocks[i] - own) * len(cfg.level_config[i])
            if i > 0:
                up = conv_transpose(cfg.c_hidden[i - 1], 2, 2, 0, f"up_blocks_{u}_{j}_1", dt, pdt)
                x = up(layer_norm(x))

        out = conv(2 * cfg.c_out * cfg.patch_size**2, 1, "clf_1", dt, pdt, zero_init=True)(layer_norm(x))
        a, b = jnp.split(pixel_shuffle(out, cfg.patch_size).astype(jnp.float32), 2, axis=-1)
        b = jax.nn.sigmoid(b) * (1 - 2e-3) + 1e-3
        return ((x_in.astype(jnp.float32) - a) / b).astype(x_in.dtype)
