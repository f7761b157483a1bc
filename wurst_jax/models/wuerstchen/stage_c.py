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
from wurst_jax.models.repeat import apply_repeats


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
    """x [B, h, w, c_in], r [B], c [B, T, c_cond] → predicted noise [B, h, w, c_in].

    The `depth` identical (ResBlock, TimestepBlock, AttnBlock) triples keep diffusers' flat names `blocks_0` ...
    whatever the execution options, so one parameter tree serves all of them:
    - `scan_blocks`: run the triples as one `jax.lax.scan` over their stacked parameters, so XLA compiles one
      triple instead of `depth` (the stack is a copy of the block parameters per call, in `param_dtype`).
    - `remat`: rematerialise each triple in the backward pass (`jax.checkpoint`): activations of one triple kept
      instead of `depth`, for one more forward in the step.
    - `stream_blocks`: sequential offload: the triples' parameters stay in host memory and one triple's are moved to
      the device per scan step (scans; the caller keeps the others on the device: `streamed_names`).
    With any of them (`models/repeat.py`), dropout draws one key per block from the "dropout" stream (masks differ from
    the default path's, not their distribution); in deterministic mode the paths compute the same function.
    """

    config: StageCConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_blocks: bool = False
    remat: bool = False
    stream_blocks: bool = False

    def streamed_names(self) -> tuple[str, ...]:
        """The top-level parameter names `stream_blocks` moves to the device itself, one triple at a time."""
        return tuple(f"blocks_{i}" for i in range(3 * self.config.depth)) if self.stream_blocks else ()

    @nn.compact
    def __call__(self, x: jax.Array, r: jax.Array, c: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x_in = x
        x = conv(cfg.c, 1, "projection", dt, pdt)(x.astype(dt))
        c_embed = dense(cfg.c, "cond_mapper_0", dt, pdt)(c.astype(dt))
        c_embed = dense(cfg.c, "cond_mapper_2", dt, pdt)(nn.leaky_relu(c_embed, 0.2))
        r_embed = timestep_embedding(r, cfg.c_r)

        def args(block: nn.Module) -> tuple:  # each block's inputs after x
            if isinstance(block, ResBlock):
                return None, deterministic
            return (c_embed, deterministic) if isinstance(block, AttnBlock) else (r_embed,)

        if (self.scan_blocks or self.remat or self.stream_blocks) and not self.is_initializing():
            names = [[f"blocks_{3 * i + k}" for k in range(3)] for i in range(cfg.depth)]
            kw = dict(scan=self.scan_blocks, remat=self.remat, deterministic=deterministic, stream=self.stream_blocks)
            x = apply_repeats(self, x, names, self._block_modules(), args, **kw)
        else:
            for i in range(cfg.depth):
                for block in self._block_modules(i):
                    x = block(x, *args(block))
        out = conv(cfg.c_in * 2, 1, "out_1", dt, pdt, zero_init=True)(layer_norm(x)).astype(jnp.float32)
        a, b = jnp.split(out, 2, axis=-1)
        return ((x_in.astype(jnp.float32) - a) / (jnp.abs(1 - b) + 1e-5)).astype(x_in.dtype)

    def _block_modules(self, i: int | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
        """Triple `i`'s modules as children `blocks_{3i}` ... of this one; with `i` None, unbound ones to `apply`."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        kw = [dict(parent=None)] * 3 if i is None else [dict(name=f"blocks_{3 * i + k}") for k in range(3)]
        return (
            ResBlock(cfg.c, dropout=cfg.dropout, dtype=dt, param_dtype=pdt, **kw[0]),
            TimestepBlock(cfg.c, dt, pdt, **kw[1]),
            AttnBlock(cfg.c, cfg.c, cfg.nhead, True, cfg.dropout, dt, pdt, **kw[2]),
        )
