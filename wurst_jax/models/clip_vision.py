"""The CLIP vision tower with projection (transformers' `CLIPVisionModelWithProjection`), NHWC.

Stable Cascade's image variation embeds each image with OpenAI's ViT-L/14 (`image_embeds`, 768-d). Patches come
from a stride-`patch_size` convolution without bias, a class token and learned positions are added, then
`pre_layrnorm` (transformers' spelling), the pre-LN encoder shared with the text tower, `post_layernorm` on the class
token and `visual_projection` (no bias). Parameter paths mirror transformers' keys
(`vision_model.embeddings.patch_embedding.weight` ↔ `vision_model/embeddings/patch_embedding/kernel`). Pixels come
in already normalised: see `clip_image.preprocess`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.clip_text import CLIP_ACTIVATIONS, CLIPEncoder, clip_layer_norm
from wurst_jax.models.layers import EMBED, VOCAB, conv, dense


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Field names are transformers' `CLIPVisionConfig` keys; the defaults are ViT-L/14's."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(CLIP_ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int (square images and patches), got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_l14(cls) -> CLIPVisionConfig:
        """openai/clip-vit-large-patch14 as Stable Cascade's `image_encoder` (303,966,208 parameters)."""
        return cls()

    @classmethod
    def tiny(cls, hidden_act: str = "quick_gelu") -> CLIPVisionConfig:
        return cls(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            hidden_act=hidden_act,
        )


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = conv(cfg.hidden_size, p, "patch_embedding", self.dtype, self.param_dtype, stride=p, use_bias=False)
        x = patches(pixels.astype(self.dtype))  # [B, H/p, W/p, D]
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.hidden_size)  # row-major (h, w), as torch's flatten(2) of NCHW
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (EMBED,))
        cls = self.param("class_embedding", init, (cfg.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size))
        positions = nn.Embed(
            cfg.num_positions,
            cfg.hidden_size,
            self.dtype,
            self.param_dtype,
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            name="position_embedding",
        )
        return jnp.concatenate([cls, x], axis=1) + positions(jnp.arange(cfg.num_positions)[None])


class _VisionTransformer(nn.Module):
    """Returns (last_hidden_state [B, 1 + N, D] — no final norm, as transformers —, pooled [B, D])."""

    config: CLIPVisionConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = _VisionEmbeddings(cfg, dt, pdt, name="embeddings")(pixels)
        x = clip_layer_norm(x, cfg.layer_norm_eps, "pre_layrnorm", pdt)
        x = CLIPEncoder(cfg, dt, pdt, name="encoder")(x)
        return x, clip_layer_norm(x[:, 0], cfg.layer_norm_eps, "post_layernorm", pdt)


class CLIPVisionOutput(NamedTuple):
    """What `CLIPVisionModelWithProjection` returns (a pytree, so it passes through `jax.jit`)."""

    image_embeds: jax.Array  # [B, P], pooled_output @ visual_projection
    last_hidden_state: jax.Array  # [B, 1 + N, D], the last encoder layer's output (class token first)
    pooled_output: jax.Array  # [B, D], post_layernorm of the class token


class CLIPVisionModelWithProjection(nn.Module):
    """pixel_values [B, image_size, image_size, num_channels] (normalised, NHWC) → `CLIPVisionOutput`."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [B, {', '.join(map(str, want))}] (NHWC), got {pixel_values.shape}")
        last, pooled = _VisionTransformer(cfg, self.dtype, self.param_dtype, name="vision_model")(pixel_values)
        projection = dense(
            cfg.projection_dim, "visual_projection", self.dtype, self.param_dtype, use_bias=False, axes=(EMBED, None)
        )
        return CLIPVisionOutput(projection(pooled), last, pooled)


def example_inputs(config: CLIPVisionConfig) -> tuple[jax.ShapeDtypeStruct]:
    """(pixel_values,) [1, image_size, image_size, num_channels] f32: the only input size the model accepts."""
    return (jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32),)
