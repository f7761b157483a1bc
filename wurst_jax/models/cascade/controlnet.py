"""Stable Cascade's stage C ControlNet (the original repository's `modules/controlnet.py`), NHWC.

A condition image [B, H, W, c_in] (Canny edges, image + inpainting mask, or the EfficientNet embedding of a
low-resolution image; see `wurst_jax/controlnet/filters.py`) goes through a bottleneck to an embedding
[B, h, w, E] and one projection per entry of `proj_blocks` (1×1 conv E → E, LeakyReLU 0.2, 1×1 conv E → c_proj,
no biases, the last zero-initialised). The result is a tuple indexed by stage C ResBlock ordinal: entry n (None
where no projection) is resized bilinearly (align_corners) to the block's input and added to it just before the
n-th ResBlock that stage C runs, counted down then up (`StableCascadeUNet(..., control=...)`).

Bottlenecks (`bottleneck_mode`):
- "effnet" (canny, inpainting): torchvision's EfficientNetV2-S `features` (the 1280-channel /32 backbone of
  `models/effnet.py`) in inference mode (running BatchNorm statistics, as the original trains it with
  `backbone.eval()`); for c_in ≠ 3 the original replaces the stem with an unpadded 3×3 stride-2 conv.
- "large" (super-resolution): 1×1 conv c_in → 16384, LeakyReLU, 1×1 conv → 1024, 8 residual blocks
  (LayerNorm, GELU, 3×3 conv, twice), 1×1 conv → 1280.
- "simple": 3×3 conv c_in → 4·c_in, LeakyReLU, 3×3 conv → c_in (E = c_in).
Parameter names are the original state-dict keys (`projections.3.2.weight` ↔ `projections_3_2/kernel`,
`backbone.1.0.block.0.1.running_mean` ↔ batch_stats `backbone_1_0/block_0_1/mean`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.effnet import EFFNETS, EfficientNetConfig, EffnetBlock, batch_norm, conv_norm
from wurst_jax.models.layers import conv, gelu

MODES = ("effnet", "large", "simple")
# the released canny / inpainting / super-resolution files' `controlnet_blocks`: ResBlocks 0, 4 (level 0 down),
# 8, 12 (level 1 down), 51, 55 (level 1 up), 59, 63 (level 0 up) of the 3.6B stage C's 64
RELEASED_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)

Control = tuple  # per-ResBlock control tensors [B, h, w, C] or None, indexed by ResBlock ordinal


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """`c_in`, `c_proj`, `proj_blocks`, `bottleneck_mode` are the original constructor's arguments; the rest sizes
    the bottlenecks (the original's fixed widths by default)."""

    c_in: int = 3
    c_proj: int = 2048  # stage C's channels (2048; the lite prior's 1536)
    proj_blocks: tuple[int, ...] = RELEASED_BLOCKS
    bottleneck_mode: str = "effnet"
    effnet: str = "efficientnet_v2_s"  # "effnet" mode's backbone (`models/effnet.py` stage tables)
    c_embd: int = 1280  # the embedding width E ("effnet": the backbone's last conv; "large": its output conv)
    large_hidden: int = 4096 * 4
    large_channels: int = 1024
    large_blocks: int = 8

    def __post_init__(self):
        object.__setattr__(self, "proj_blocks", tuple(int(b) for b in self.proj_blocks))
        if self.bottleneck_mode not in MODES:
            raise ValueError(f"ControlNetConfig.bottleneck_mode must be one of {MODES}, got {self.bottleneck_mode!r}")
        if self.effnet not in EFFNETS:
            raise ValueError(f"ControlNetConfig.effnet must be one of {EFFNETS}, got {self.effnet!r}")
        if not self.proj_blocks or min(self.proj_blocks) < 0 or len(set(self.proj_blocks)) != len(self.proj_blocks):
            raise ValueError(
                f"ControlNetConfig.proj_blocks must be distinct ResBlock indices >= 0, got {self.proj_blocks}"
            )
        if min(self.c_in, self.c_proj, self.c_embd) < 1:
            raise ValueError(f"ControlNetConfig: c_in, c_proj and c_embd must be >= 1, got {self}")

    @property
    def embd_channels(self) -> int:
        return self.c_in if self.bottleneck_mode == "simple" else self.c_embd

    @property
    def num_controls(self) -> int:
        """The length of the output tuple: max(proj_blocks) + 1."""
        return max(self.proj_blocks) + 1

    # ------------------------------------------------------------------ presets (the released files)

    @classmethod
    def canny(cls) -> ControlNetConfig:
        """`controlnet/canny.safetensors`: one-channel Canny edges, EfficientNetV2-S bottleneck (54,255,776
        parameters)."""
        return cls(c_in=1)

    @classmethod
    def inpainting(cls) -> ControlNetConfig:
        """`controlnet/inpainting.safetensors`: RGB with the masked region white, plus the mask (4 channels; 54,256,424
        parameters)."""
        return cls(c_in=4)

    @classmethod
    def sr(cls) -> ControlNetConfig:
        """`controlnet/super_resolution.safetensors`: the 16-channel EfficientNet embedding, large bottleneck
        (203,491,584 parameters)."""
        return cls(c_in=16, bottleneck_mode="large")

    @classmethod
    def identity(cls) -> ControlNetConfig:
        """The original's face-identity config (no released weights): 512 channels, simple, all 64 blocks."""
        return cls(c_in=512, bottleneck_mode="simple", proj_blocks=tuple(range(64)))

    @classmethod
    def tiny(cls) -> ControlNetConfig:
        """For tests: the tiny EfficientNet backbone, projections into a 16-channel stage C at ResBlocks 0, 2, 3, 5."""
        return cls(c_in=1, c_proj=16, proj_blocks=(0, 2, 3, 5), effnet="tiny", c_embd=48)

    @classmethod
    def tiny_large(cls) -> ControlNetConfig:
        """For tests: the "large" bottleneck, narrow."""
        return cls(
            c_in=4,
            c_proj=16,
            proj_blocks=(1, 4),
            bottleneck_mode="large",
            c_embd=12,
            large_hidden=32,
            large_channels=8,
            large_blocks=2,
        )


def _leaky(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, 0.2)


class CNetResBlock(nn.Module):
    """x + (LayerNorm → GELU → 3×3 conv) twice; the LayerNorms have affine parameters (eps 1e-5, in float32)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt, pdt = x.shape[-1], self.dtype, self.param_dtype
        h = x
        for i in (0, 3):
            h = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=pdt, name=f"blocks_{i}")(h).astype(dt)
            h = conv(c, 3, f"blocks_{i + 2}", dt, pdt, padding=1)(gelu(h))
        return x + h


class StableCascadeControlNet(nn.Module):
    """Condition images [B, H, W, c_in] → `config.num_controls` entries: [B, h, w, c_proj] at `proj_blocks`,
    None elsewhere ("effnet": h, w ≈ H/32, W/32; the other bottlenecks keep H, W)."""

    config: ControlNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> Control:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        if x.ndim != 4 or x.shape[-1] != cfg.c_in:
            raise ValueError(f"StableCascadeControlNet: the condition must be [B, H, W, {cfg.c_in}], got {x.shape}")
        h = x.astype(dt)
        if cfg.bottleneck_mode == "effnet":
            h = self._effnet(h)
        elif cfg.bottleneck_mode == "simple":
            h = _leaky(conv(4 * cfg.c_in, 3, "backbone_0", dt, pdt, padding=1)(h))
            h = conv(cfg.c_in, 3, "backbone_2", dt, pdt, padding=1)(h)
        else:
            h = _leaky(conv(cfg.large_hidden, 1, "backbone_0", dt, pdt)(h))
            h = conv(cfg.large_channels, 1, "backbone_2", dt, pdt)(h)
            for i in range(cfg.large_blocks):
                h = CNetResBlock(dt, pdt, name=f"backbone_{3 + i}")(h)
            h = conv(cfg.c_embd, 1, f"backbone_{3 + cfg.large_blocks}", dt, pdt)(h)
        e = cfg.embd_channels
        out: list[jax.Array | None] = [None] * cfg.num_controls
        for i, block in enumerate(cfg.proj_blocks):
            p = _leaky(conv(e, 1, f"projections_{i}_0", dt, pdt, use_bias=False)(h))
            out[block] = conv(cfg.c_proj, 1, f"projections_{i}_2", dt, pdt, use_bias=False, zero_init=True)(p)
        return tuple(out)

    def _effnet(self, x: jax.Array) -> jax.Array:
        """torchvision's EfficientNetV2 `features` (`backbone_0` … `backbone_{n+1}`), BatchNorm on running stats."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        net = EfficientNetConfig(effnet=cfg.effnet)
        pad = 1 if cfg.c_in == 3 else 0  # the original's replacement stem for c_in != 3 has no padding
        h = conv(net.stem, 3, "backbone_0_0", dt, pdt, stride=2, padding=pad, use_bias=False)(x)
        h = nn.silu(batch_norm("backbone_0_1", 1e-3, True, pdt)(h).astype(dt))
        for s, (kind, expand, kernel, stride, features, layers) in enumerate(net.stages, start=1):
            for i in range(layers):
                stride_i = stride if i == 0 else 1
                h = EffnetBlock(kind, expand, kernel, stride_i, features, dt, pdt, name=f"backbone_{s}_{i}")(h)
        return conv_norm(h, cfg.c_embd, 1, f"backbone_{len(net.stages) + 1}", dt, pdt)


def scale_control(control: Control | None, scale: float | jax.Array) -> Control | None:
    """Each control tensor times `scale` (the original notebooks' `cnet_multiplier`, diffusers'
    `controlnet_conditioning_scale`); None entries stay None."""
    if control is None:
        return None
    return tuple(None if c is None else c * jnp.asarray(scale, c.dtype) for c in control)


def example_inputs(config: ControlNetConfig) -> tuple[jax.ShapeDtypeStruct]:
    """A condition that creates every parameter (64² keeps the unpadded effnet stem at >= 1 pixel)."""
    return (jax.ShapeDtypeStruct((1, 64, 64, config.c_in), jnp.float32),)


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> ControlNetConfig:
    """The config of an original ControlNet file from its tensor shapes. Which ResBlocks the projections feed is
    not stored: 8 projections are the released files' `RELEASED_BLOCKS`, 64 every block; other counts need a
    config."""
    n = sum(1 for k in shapes if re.fullmatch(r"projections\.\d+\.0\.weight", k))
    if n == 0 or "projections.0.2.weight" not in shapes:
        raise ValueError("not a Stable Cascade ControlNet checkpoint: no projections.<i>.0.weight / .2.weight tensors")
    blocks = {len(RELEASED_BLOCKS): RELEASED_BLOCKS, 64: tuple(range(64))}.get(n)
    if blocks is None:
        raise ValueError(
            f"a ControlNet with {n} projections: which stage C ResBlocks they feed is not stored in the file; "
            "pass a config (--config '{\"proj_blocks\": [...], ...}')"
        )
    embd, c_proj = shapes["projections.0.0.weight"][0], shapes["projections.0.2.weight"][0]
    common = dict(c_proj=c_proj, proj_blocks=blocks)
    if "backbone.0.1.running_mean" in shapes:  # a torchvision backbone: its stem width and depth name it
        stem, c_in = shapes["backbone.0.0.weight"][:2]
        parts = len({k.split(".")[1] for k in shapes if k.startswith("backbone.")})
        nets = {name: EfficientNetConfig(effnet=name) for name in EFFNETS}
        found = [name for name, c in nets.items() if (c.stem, len(c.stages) + 2) == (stem, parts)]
        if not found:
            raise ValueError(f"a ControlNet backbone with a {stem}-channel stem and {parts} parts is none of {EFFNETS}")
        return ControlNetConfig(c_in=c_in, effnet=found[0], c_embd=embd, **common)
    hidden, c_in = shapes["backbone.0.weight"][:2]
    res = sum(1 for k in shapes if re.fullmatch(r"backbone\.\d+\.blocks\.0\.weight", k))
    if res == 0:
        return ControlNetConfig(c_in=c_in, bottleneck_mode="simple", **common)
    return ControlNetConfig(
        c_in=c_in,
        bottleneck_mode="large",
        c_embd=embd,
        large_hidden=hidden,
        large_channels=shapes["backbone.2.weight"][0],
        large_blocks=res,
        **common,
    )
