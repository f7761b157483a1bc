"""The CLIP text transformer (transformers' `CLIPTextModel`), returning `last_hidden_state`.

Pre-LN blocks with a causal mask combined with the padding mask, a final LayerNorm. Parameter paths mirror
transformers' keys (`text_model.encoder.layers.0.self_attn.q_proj.weight` ↔
`text_model/encoder/layers_0/self_attn/q_proj/kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import EMBED, HEADS, MLP, VOCAB, dense, dot_product_attention, gelu

_ACTIVATIONS = {"gelu": gelu, "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Field names are transformers' `CLIPTextConfig` keys."""

    vocab_size: int = 49408
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 20
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")

    @classmethod
    def vit_bigg(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG-14 text tower, the prior's text encoder (693,021,440 parameters)."""
        return cls()

    @classmethod
    def vit_h(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H-14 text tower, the decoder's text encoder (352,984,064 parameters)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)

    @classmethod
    def tiny(cls, hidden_act: str = "gelu") -> CLIPTextConfig:
        return cls(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act=hidden_act,
        )


def _layer_norm(x: jax.Array, eps: float, name: str, param_dtype: Any) -> jax.Array:
    ln = nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        name=name,
    )
    return ln(x.astype(jnp.float32)).astype(x.dtype)


class _SelfAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = h.shape
        nh = self.config.num_attention_heads
        proj = lambda n: dense(d, n, self.dtype, self.param_dtype, axes=(EMBED, HEADS))(h).reshape(b, t, nh, d // nh)
        out = dot_product_attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), mask).reshape(b, t, d)
        return dense(d, "out_proj", self.dtype, self.param_dtype, axes=(HEADS, EMBED))(out)


class _MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "fc1", self.dtype, self.param_dtype)(h))
        return dense(cfg.hidden_size, "fc2", self.dtype, self.param_dtype, axes=(MLP, EMBED))(h)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = x + _SelfAttention(cfg, dt, pdt, name="self_attn")(
            _layer_norm(x, cfg.layer_norm_eps, "layer_norm1", pdt), mask
        )
        return x + _MLP(cfg, dt, pdt, name="mlp")(_layer_norm(x, cfg.layer_norm_eps, "layer_norm2", pdt))


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED))
        embed = lambda n, rows: nn.Embed(rows, cfg.hidden_size, self.dtype, self.param_dtype, init, name=n)
        positions = jnp.arange(ids.shape[1])[None]
        return embed("token_embedding", cfg.vocab_size)(ids) + embed("position_embedding", cfg.max_position_embeddings)(
            positions
        )


class _Encoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
        return x


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = _Embeddings(cfg, dt, pdt, name="embeddings")(ids)
        x = _Encoder(cfg, dt, pdt, name="encoder")(x, mask)
        return _layer_norm(x, cfg.layer_norm_eps, "final_layer_norm", pdt)


class CLIPTextModel(nn.Module):
    """input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = padding) → last_hidden_state [B, T, D]."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        t = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        return _TextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(input_ids, mask)
