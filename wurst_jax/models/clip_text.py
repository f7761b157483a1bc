"""The CLIP text transformer: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.

Pre-LN blocks with a causal mask combined with the padding mask, a final LayerNorm. Parameter paths mirror
transformers' keys (`text_model.encoder.layers.0.self_attn.q_proj.weight` ↔
`text_model/encoder/layers_0/self_attn/q_proj/kernel`). `CLIPEncoder` (the stack of pre-LN layers) is shared with
the vision tower in `clip_vision.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.layers import EMBED, HEADS, MLP, VOCAB, dense, dot_product_attention, gelu

CLIP_ACTIVATIONS = {"gelu": gelu, "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}

# transformers kept the pre-#24773 pooling for configs whose eos_token_id is this (wrong) legacy value.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Field names are transformers' `CLIPTextConfig` keys (`eos_token_id`, `projection_dim` with its defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 20
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(CLIP_ACTIVATIONS)}, got {self.hidden_act!r}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id must be an int, got {self.eos_token_id!r}")

    @classmethod
    def vit_bigg(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG-14 text tower: the Würstchen v2 prior's and Stable Cascade's text encoder.

        693,021,440 parameters without the projection, 694,659,840 with it (`CLIPTextModelWithProjection`).
        `eos_token_id` 2 as laion's bigG configs carry it (SDXL's text_encoder_2): the legacy pooling rule, which
        picks the same token as the first-EOS rule with the CLIP tokenizer (its EOS, 49407, is the largest id).
        """
        return cls(projection_dim=1280, eos_token_id=LEGACY_EOS_TOKEN_ID)

    @classmethod
    def vit_h(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H-14 text tower, the decoder's text encoder (352,984,064 parameters)."""
        return cls(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, projection_dim=1024
        )

    @classmethod
    def tiny(cls, hidden_act: str = "gelu", eos_token_id: int = 999) -> CLIPTextConfig:
        """A 2-layer tower for tests; the end-of-text id must lie inside its 1000-token vocabulary."""
        return cls(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act=hidden_act,
            projection_dim=24,
            eos_token_id=eos_token_id,
        )


def clip_layer_norm(x: jax.Array, eps: float, name: str, param_dtype: Any) -> jax.Array:
    """transformers' `nn.LayerNorm(hidden_size)` computed in float32; call inside a compact module."""
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
    config: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, d = h.shape
        nh = self.config.num_attention_heads
        proj = lambda n: dense(d, n, self.dtype, self.param_dtype, axes=(EMBED, HEADS))(h).reshape(b, t, nh, d // nh)
        out = dot_product_attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), mask).reshape(b, t, d)
        return dense(d, "out_proj", self.dtype, self.param_dtype, axes=(HEADS, EMBED))(out)


class _MLP(nn.Module):
    config: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        h = CLIP_ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "fc1", self.dtype, self.param_dtype)(h))
        return dense(cfg.hidden_size, "fc2", self.dtype, self.param_dtype, axes=(MLP, EMBED))(h)


class _EncoderLayer(nn.Module):
    config: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = x + _SelfAttention(cfg, dt, pdt, name="self_attn")(
            clip_layer_norm(x, cfg.layer_norm_eps, "layer_norm1", pdt), mask
        )
        return x + _MLP(cfg, dt, pdt, name="mlp")(clip_layer_norm(x, cfg.layer_norm_eps, "layer_norm2", pdt))


class CLIPEncoder(nn.Module):
    """transformers' `CLIPEncoder`: `num_hidden_layers` pre-LN blocks `layers_N`, [B, T, D] → [B, T, D].

    `config` is a `CLIPTextConfig` or a `CLIPVisionConfig` (the fields both have: hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, hidden_act, layer_norm_eps). `mask` broadcasts to [B, N, T, T]
    (None: every token sees every token, as in the vision tower).
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
        return x


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


class _TextTransformer(nn.Module):
    """Returns (the last encoder layer's output, the same after `final_layer_norm`), both [B, T, D]."""

    config: CLIPTextConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = _Embeddings(cfg, dt, pdt, name="embeddings")(ids)
        x = CLIPEncoder(cfg, dt, pdt, name="encoder")(x, mask)
        return x, clip_layer_norm(x, cfg.layer_norm_eps, "final_layer_norm", pdt)


def _attention_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Causal mask [1, 1, T, T], combined with the padding mask (1 = token) into [B, 1, T, T] if given."""
    t = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask[:, None, None, :] > 0)
    return mask


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of the pooled (end-of-text) token, chosen as transformers does.

    Legacy configs (`eos_token_id == 2`) take the largest token id (the tokenizer's EOS is the largest id);
    otherwise the first position holding `eos_token_id` (0 if there is none), so a padding token equal to EOS is
    never picked.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nn.Module):
    """input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = padding) → last_hidden_state [B, T, D]."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        mask = _attention_mask(input_ids, attention_mask)
        return _TextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(input_ids, mask)[1]


class CLIPTextOutput(NamedTuple):
    """What `CLIPTextModelWithProjection` returns (a pytree, so it passes through `jax.jit`)."""

    last_hidden_state: jax.Array  # [B, T, D], after final_layer_norm
    hidden_states_last: jax.Array  # [B, T, D], the last encoder layer's output (transformers' hidden_states[-1])
    pooled_output: jax.Array  # [B, D], last_hidden_state at the end-of-text token
    text_embeds: jax.Array  # [B, P], pooled_output @ text_projection


class CLIPTextModelWithProjection(nn.Module):
    """transformers' `CLIPTextModelWithProjection`: the text model plus `text_projection` (no bias).

    input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = padding) → `CLIPTextOutput`. Stable Cascade
    conditions on `hidden_states_last` (not `last_hidden_state`) and `text_embeds`.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        cfg = self.config
        mask = _attention_mask(input_ids, attention_mask)
        pre_ln, last = _TextTransformer(cfg, self.dtype, self.param_dtype, name="text_model")(input_ids, mask)
        pooled = jnp.take_along_axis(last, pooled_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        projection = dense(
            cfg.projection_dim, "text_projection", self.dtype, self.param_dtype, use_bias=False, axes=(EMBED, None)
        )
        return CLIPTextOutput(last, pre_ln, pooled, projection(pooled))


def example_inputs(config: CLIPTextConfig) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """(input_ids, attention_mask) [1, 4] int32: the smallest inputs that create every parameter of either model."""
    del config  # the parameter shapes do not depend on the sequence length
    return jax.ShapeDtypeStruct((1, 4), jnp.int32), jax.ShapeDtypeStruct((1, 4), jnp.int32)
