"""The semantic encoder Würstchen's Stage B and C were trained on: EfficientNetV2 features and a 1×1 mapper, NHWC.

`EfficientNetEncoder` is the original's `EfficientNetEncoder` (also in diffusers' Würstchen training example):
torchvision's `efficientnet_v2_s(...).features` as `backbone`, then `mapper` = a 1×1 conv from the backbone's 1280
channels to `c_latent` (16) and a BatchNorm. Images [B, H, W, 3], normalised with the ImageNet mean and std
(`normalize`), become the semantic latents [B, H/32, W/32, 16] that `WuerstchenPriorPipeline` predicts and Stage B is
conditioned on (at 768² for 1024² images: 24 × 24, the prior's grid). Stage C learns them divided as
`(x + latent_std) / latent_mean` (see `wurst_jax.train.finetune`).

The encoder is frozen in every Würstchen training recipe, so it runs in inference mode only: BatchNorm uses its
running statistics (`batch_stats`) and stochastic depth is the identity. Parameter names mirror the PyTorch keys
(`backbone.4.0.block.1.0.weight` ↔ `backbone_4_0/block_1_0/kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import conv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNSCALE = 32  # the backbone's total stride

# torchvision's stage tables: (block, expand ratio, kernel, stride, output channels, layers); the stem's output
# is the first stage's input.
_STAGES = {
    "efficientnet_v2_s": (
        24,
        (
            ("fused", 1, 3, 1, 24, 2),
            ("fused", 4, 3, 2, 48, 4),
            ("fused", 4, 3, 2, 64, 4),
            ("mb", 4, 3, 2, 128, 6),
            ("mb", 6, 3, 1, 160, 9),
            ("mb", 6, 3, 2, 256, 15),
        ),
    ),
    "efficientnet_v2_l": (
        32,
        (
            ("fused", 1, 3, 1, 32, 4),
            ("fused", 4, 3, 2, 64, 7),
            ("fused", 4, 3, 2, 96, 7),
            ("mb", 4, 3, 2, 192, 10),
            ("mb", 6, 3, 1, 224, 19),
            ("mb", 6, 3, 2, 384, 25),
            ("mb", 6, 3, 1, 640, 7),
        ),
    ),
    # not a torchvision model: the same block types, few and narrow, for fast tests
    "tiny": (
        8,
        (
            ("fused", 1, 3, 1, 8, 1),
            ("fused", 2, 3, 2, 16, 2),
            ("mb", 2, 3, 2, 24, 1),
            ("mb", 2, 3, 2, 32, 2),
            ("mb", 2, 3, 2, 40, 1),
        ),
    ),
}
EFFNETS = tuple(_STAGES)


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """Hyper-parameters; `c_latent`, `c_cond`, `effnet` are the config keys of diffusers' training example."""

    c_latent: int = 16
    c_cond: int = 1280  # the backbone's last conv width, the mapper's input
    effnet: str = "efficientnet_v2_s"
    mapper_affine: bool = True  # the mapper's BatchNorm has weight and bias (Würstchen v2; False: Stable Cascade)

    def __post_init__(self):
        if self.effnet not in _STAGES:
            raise ValueError(f"effnet must be one of {EFFNETS}, got {self.effnet!r}")

    @classmethod
    def v2(cls) -> EfficientNetConfig:
        """The encoder stored as `effnet_state_dict` in Würstchen v2's `model_v2_stage_b.pt`."""
        return cls()

    @classmethod
    def tiny(cls) -> EfficientNetConfig:
        return cls(c_latent=4, c_cond=48, effnet="tiny")

    @property
    def stem(self) -> int:
        return _STAGES[self.effnet][0]

    @property
    def stages(self) -> tuple[tuple[str, int, int, int, int, int], ...]:
        return _STAGES[self.effnet][1]


def normalize(images: jax.Array) -> jax.Array:
    """RGB in [0, 1], [..., 3] → the encoder's input (ImageNet mean and std, as torchvision's `Normalize`)."""
    return (images - jnp.asarray(IMAGENET_MEAN, images.dtype)) / jnp.asarray(IMAGENET_STD, images.dtype)


def encode(module: nn.Module, variables: Any, images: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """RGB images [B, H, W, 3] (uint8, or float in [0, 1]) → semantic latents [B, h/32, w/32, C] float32: scaled to
    [0, 1], resized (antialiased bilinear) to the encoder's input `size` (h, w; an int: square), normalised and
    encoded by `module` (an `EfficientNetEncoder`) with `variables`. Pure: jit it, shard it as you like."""
    h, w = (size, size) if isinstance(size, int) else size
    x = images.astype(jnp.float32) / 255.0 if jnp.issubdtype(images.dtype, jnp.integer) else images.astype(jnp.float32)
    x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "linear", antialias=True)
    return module.apply(variables, normalize(x)).astype(jnp.float32)


def conv_norm(
    x: jax.Array,
    features: int,
    kernel: int,
    name: str,
    dtype: Any,
    param_dtype: Any,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> jax.Array:
    """torchvision's `Conv2dNormActivation` inside a compact module: conv `{name}_0` (no bias, 'same' padding) →
    BatchNorm `{name}_1` → SiLU unless `act` is False."""
    pad = (kernel - 1) // 2
    x = conv(features, kernel, f"{name}_0", dtype, param_dtype, stride, pad, groups, use_bias=False)(x)
    x = batch_norm(f"{name}_1", 1e-3, True, param_dtype)(x).astype(dtype)
    return nn.silu(x) if act else x


def batch_norm(name: str, eps: float, affine: bool, param_dtype: Any) -> nn.BatchNorm:
    """Inference BatchNorm in float32 (running statistics in `batch_stats`)."""
    return nn.BatchNorm(
        use_running_average=True,
        epsilon=eps,
        use_scale=affine,
        use_bias=affine,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        name=name,
    )


class SqueezeExcitation(nn.Module):
    """x · sigmoid(fc2(silu(fc1(mean over H, W)))), the 1×1 convs with bias (torchvision's `SqueezeExcitation`)."""

    squeeze: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = nn.silu(conv(self.squeeze, 1, "fc1", self.dtype, self.param_dtype)(s))
        return x * nn.sigmoid(conv(x.shape[-1], 1, "fc2", self.dtype, self.param_dtype)(s))


class EffnetBlock(nn.Module):
    """torchvision's `FusedMBConv` (kind "fused") or `MBConv` ("mb"), at inference (no stochastic depth)."""

    kind: str
    expand: int
    kernel: int
    stride: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in, wide = x.shape[-1], x.shape[-1] * self.expand
        dt, pdt = self.dtype, self.param_dtype
        if self.kind == "fused" and wide == c_in:
            h = conv_norm(x, self.features, self.kernel, "block_0", dt, pdt, self.stride)
        elif self.kind == "fused":
            h = conv_norm(x, wide, self.kernel, "block_0", dt, pdt, self.stride)
            h = conv_norm(h, self.features, 1, "block_1", dt, pdt, act=False)
        else:
            h, n = (conv_norm(x, wide, 1, "block_0", dt, pdt), 1) if wide != c_in else (x, 0)
            h = conv_norm(h, wide, self.kernel, f"block_{n}", dt, pdt, self.stride, groups=wide)
            h = SqueezeExcitation(max(1, c_in // 4), dt, pdt, name=f"block_{n + 1}")(h)
            h = conv_norm(h, self.features, 1, f"block_{n + 2}", dt, pdt, act=False)
        return h + x if self.stride == 1 and c_in == self.features else h


class EfficientNetEncoder(nn.Module):
    """Normalised images [B, H, W, 3] → semantic latents [B, ceil(H/32), ceil(W/32), c_latent] (float32 out)."""

    config: EfficientNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = conv_norm(x.astype(dt), cfg.stem, 3, "backbone_0", dt, pdt, stride=2)
        for s, (kind, expand, kernel, stride, features, layers) in enumerate(cfg.stages, start=1):
            for i in range(layers):
                h = EffnetBlock(
                    kind, expand, kernel, stride if i == 0 else 1, features, dt, pdt, name=f"backbone_{s}_{i}"
                )(h)
        h = conv_norm(h, cfg.c_cond, 1, f"backbone_{len(cfg.stages) + 1}", dt, pdt)
        h = conv(cfg.c_latent, 1, "mapper_0", dt, pdt, use_bias=False)(h)
        return batch_norm("mapper_1", 1e-5, cfg.mapper_affine, pdt)(h)
