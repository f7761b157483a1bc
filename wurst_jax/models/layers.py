"""Building blocks shared by the Würstchen stages, NHWC, named after the PyTorch state-dict keys.

Every module takes `dtype` (compute) and `param_dtype` (storage). Norms, softmax and the timestep
embedding run in float32 whatever `dtype` is, because the model family overflows in half precision.
Parameter names mirror diffusers' keys with "." before a list index replaced by "_"
(`blocks.3.attention.to_q.weight` ↔ `blocks_3/attention/to_q/kernel`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names used by the sharding rules (wurst_jax/sharding.py maps them to mesh axes).
EMBED, MLP, HEADS, CONV_IN, CONV_OUT, KH, KW, VOCAB = (
    "embed",
    "mlp",
    "heads",
    "conv_in",
    "conv_out",
    "kh",
    "kw",
    "vocab",
)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's `nn.GELU()` default."""
    return nn.gelu(x, approximate=False)


def _kernel_init(zero: bool) -> Any:
    """Zero init for output heads and FiLM mappers (the model starts as identity / predicts x_t), else LeCun."""
    return nn.initializers.zeros if zero else nn.initializers.lecun_normal()


def dense(
    features: int,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
    axes=(EMBED, MLP),
    zero_init: bool = False,
):
    """A Linear layer (`kernel` [in, out] = torch `weight.T`) with logical axis names on its kernel."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_kernel_init(zero_init), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel: int,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: Any = 0,
    groups: int = 1,
    use_bias: bool = True,
    zero_init: bool = False,
):
    """A Conv2d in NHWC (`kernel` [kh, kw, in/groups, out] = torch weight OIHW → HWIO)."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_kernel_init(zero_init), (KH, KW, CONV_IN, CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
        name=name,
    )


def conv_transpose(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Dtype, param_dtype: Dtype):
    """PyTorch's ConvTranspose2d(kernel, stride, padding) in NHWC.

    The kernel is stored [kh, kw, out, in] (torch's [in, out, kh, kw] permuted like a conv weight) and used with
    `transpose_kernel=True`, i.e. as the gradient of the forward conv; torch's padding p becomes k - 1 - p.
    """
    pad = kernel - 1 - padding
    return nn.ConvTranspose(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        transpose_kernel=True,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (KH, KW, CONV_OUT, CONV_IN)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
        name=name,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last (channel) axis without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """[B, H, W, C] → [B, H/r, W/r, C·r·r] with PyTorch's (c, ry, rx) channel order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """[B, H, W, C·r·r] → [B, H·r, W·r, C], inverse of `pixel_unshuffle` (PyTorch channel order)."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c)


def timestep_embedding(r: jax.Array, c_r: int, max_positions: int = 10000) -> jax.Array:
    """Sinusoidal embedding of the noise ratio r [B] → [B, c_r] in float32 ([sin, cos], zero-padded if odd)."""
    r = r.astype(jnp.float32) * max_positions
    half = c_r // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    emb = r[:, None] * freq[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if c_r % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention on [B, T, N, D] heads, logits and softmax in float32. `mask` broadcasts to [B, N, Tq, Tk]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnd->btnd", weights, v)


class GlobalResponseNorm(nn.Module):
    """GRN (ConvNeXt-V2): L2 norm over H, W per channel divided by its channel mean; gamma/beta [1, 1, 1, C]."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.zeros, (None, None, None, MLP))
        gamma = self.param("gamma", init, (1, 1, 1, self.dim), self.param_dtype)
        beta = self.param("beta", init, (1, 1, 1, self.dim), self.param_dtype)
        x32 = x.astype(jnp.float32)
        # the floor keeps the gradient finite where a channel is exactly zero (d√s/ds = ∞ at s = 0 in JAX)
        agg = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True), 1e-30))
        stand = agg / (jnp.mean(agg, axis=-1, keepdims=True) + 1e-6)
        out = gamma.astype(jnp.float32) * (x32 * stand) + beta.astype(jnp.float32) + x32
        return out.astype(self.dtype)


class TimestepBlock(nn.Module):
    """x · (1 + a) + b with (a, b) = Linear(r_embed): FiLM conditioning on the timestep.

    With `conds` (Stable Cascade: ("sca", "crp")) `t` is [embed(r), embed(cond_1), ...] in equal chunks and each
    extra chunk adds its own `mapper_{cond}` Linear to (a, b).
    """

    c: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conds: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        chunks = jnp.split(t.astype(self.dtype), len(self.conds) + 1, axis=-1)
        names = ("mapper", *(f"mapper_{c}" for c in self.conds))
        ab = None
        for name, chunk in zip(names, chunks, strict=True):
            mapper = dense(self.c * 2, name, self.dtype, self.param_dtype, axes=(None, MLP), zero_init=True)
            ab = mapper(chunk) if ab is None else ab + mapper(chunk)
        a, b = jnp.split(ab[:, None, None, :], 2, axis=-1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """diffusers' `Attention(query_dim=c, heads, dim_head=c // heads, bias=True)`: to_q/to_k/to_v/to_out_0."""

    c: int
    nhead: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, deterministic: bool = True) -> jax.Array:
        b, t, _ = x.shape
        d = self.c // self.nhead
        proj = lambda name: dense(self.c, name, self.dtype, self.param_dtype, axes=(EMBED, HEADS))
        q = proj("to_q")(x).reshape(b, t, self.nhead, d)
        k = proj("to_k")(kv).reshape(b, kv.shape[1], self.nhead, d)
        v = proj("to_v")(kv).reshape(b, kv.shape[1], self.nhead, d)
        out = dot_product_attention(q, k, v).reshape(b, t, self.c)
        out = dense(self.c, "to_out_0", self.dtype, self.param_dtype, axes=(HEADS, EMBED))(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class AttnBlock(nn.Module):
    """Self-attention over the image tokens whose keys/values also include the mapped conditioning tokens."""

    c: int
    c_cond: int
    nhead: int
    self_attn: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, deterministic: bool = True) -> jax.Array:
        b, h, w, c = x.shape
        kv = dense(self.c, "kv_mapper_1", self.dtype, self.param_dtype, axes=(None, EMBED))(
            nn.silu(kv.astype(self.dtype))
        )
        norm_x = layer_norm(x).reshape(b, h * w, c)
        if self.self_attn:
            kv = jnp.concatenate([norm_x, kv.astype(norm_x.dtype)], axis=1)
        attn = Attention(self.c, self.nhead, self.dropout, self.dtype, self.param_dtype, name="attention")
        return x + attn(norm_x, kv, deterministic).reshape(b, h, w, c)


class ResBlock(nn.Module):
    """Stage C ResBlock: depthwise conv on [x, skip] (groups=c), LayerNorm, MLP with GRN, residual."""

    c: int
    c_skip: int = 0
    kernel_size: int = 3
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, x_skip: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        x_res = x
        if x_skip is not None:
            x = jnp.concatenate([x, x_skip.astype(x.dtype)], axis=-1)
        k = self.kernel_size
        x = conv(self.c, k, "depthwise", self.dtype, self.param_dtype, padding=k // 2, groups=self.c)(x)
        x = layer_norm(x)
        return x_res + channelwise(x, self.c, self.c * 4, self.dropout, self.dtype, self.param_dtype, deterministic)


class ResBlockStageB(nn.Module):
    """Stage B ResBlock: depthwise conv (groups=c), LayerNorm, concat skip, MLP with GRN, residual."""

    c: int
    c_skip: int = 0
    kernel_size: int = 3
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, x_skip: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        x_res = x
        k = self.kernel_size
        x = layer_norm(conv(self.c, k, "depthwise", self.dtype, self.param_dtype, padding=k // 2, groups=self.c)(x))
        if x_skip is not None:
            x = jnp.concatenate([x, x_skip.astype(x.dtype)], axis=-1)
        return x_res + channelwise(x, self.c, self.c * 4, self.dropout, self.dtype, self.param_dtype, deterministic)


def channelwise(x, c_out, hidden, dropout, dtype, param_dtype, deterministic):
    """`channelwise` Sequential(Linear, GELU, GRN, Dropout, Linear) — called inside a compact module."""
    x = gelu(dense(hidden, "channelwise_0", dtype, param_dtype)(x))
    x = GlobalResponseNorm(hidden, dtype, param_dtype, name="channelwise_2")(x)
    x = nn.Dropout(dropout)(x, deterministic=deterministic)
    return dense(c_out, "channelwise_4", dtype, param_dtype, axes=(MLP, EMBED))(x)
