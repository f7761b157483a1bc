"""Stable Cascade's UNet (diffusers `StableCascadeUNet`, Würstchen v3) in NHWC: stage C (the prior) and stage B
(the decoder) are this one module with different configs.

sample [B, H, W, in_channels] and the noise ratio [B] go through a patch embedding, levels of (ResBlock,
TimestepBlock, AttnBlock) sequences down and up with skip connections, and a 1×1 head. Conditioning: pooled CLIP
text (stage B: alone; stage C: with the text states and image embeddings) as attention keys/values, the timestep
embedding concatenated with those of `sca` / `crp`, and for stage B the stage C latents (`effnet`) and a pixel
preview, both resized bilinearly to the first level and added to it. Optionally a ControlNet's `control`
(`models/cascade/controlnet.py`): entry n is added before the n-th ResBlock run, counted down then up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models.cascade.blocks import UpDownBlock2d, conv_mapper, resize_bilinear
from wurst_jax.models.cascade.config import ATTN, RES, StableCascadeUNetConfig
from wurst_jax.models.layers import (
    EMBED,
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


class StableCascadeUNet(nn.Module):
    """sample [B, H, W, Cin], timestep_ratio [B], clip_text_pooled [B, 1, Cp] (or [B, Cp]), and optionally
    clip_text [B, T, Ct] with clip_img [B, n, Ci] (or [B, Ci]) — both or neither —, effnet [B, h, w, Ce],
    pixels [B, h', w', 3], sca / crp ([B] or scalars) → [B, H, W, Cout].

    `control`: a sequence indexed by ResBlock ordinal (over repeat-mapper passes, down levels then up) of None or
    [B or 1, h, w, C of that block's level], each resized (bilinear, align_corners) to the block's input and added
    to it, as the original stage C's `cnet`; None (the default) runs exactly the plain network.

    Missing inputs as in diffusers: `pixels` → zeros [B, 8, 8, 3]; `effnet` → no effnet term; `sca` / `crp` (and
    any other timestep conditioning) → zeros. Unlike diffusers, a batch of per-sample `sca` / `crp` values works,
    2-D pooled / image embeddings are read as one token, and an input the config has no mapper for raises.

    Parameter names are diffusers' state-dict keys (`down_blocks.1.4.attention.to_q.weight` ↔
    `down_blocks_1_4/attention/to_q/kernel`), the same tree whatever the execution options:
    - `scan_blocks`: a level's identical consecutive repeats of its block sequence run as one `jax.lax.scan`
      (`models/repeat.py`); in an up level the first repeat, whose ResBlock takes the skip, runs on its own.
    - `remat`: those repeats are rematerialised in the backward pass (`jax.checkpoint`).
    Repeat mappers (stage B's up levels) run a level's whole sequence several times on the same weights, a 1×1
    conv in between; every pass goes through the same modules or the same `apply_repeats` call.
    """

    config: StableCascadeUNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_blocks: bool = False
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timestep_ratio: jax.Array,
        clip_text_pooled: jax.Array,
        clip_text: jax.Array | None = None,
        clip_img: jax.Array | None = None,
        effnet: jax.Array | None = None,
        pixels: jax.Array | None = None,
        sca: jax.Array | float | None = None,
        crp: jax.Array | float | None = None,
        deterministic: bool = True,
        control: Sequence[jax.Array | None] | None = None,
    ) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        check_inputs(cfg, sample, clip_text_pooled, clip_text, clip_img, effnet, pixels, sca=sca, crp=crp)
        b = sample.shape[0]
        r_embed = self._timestep_embedding(timestep_ratio, {"sca": sca, "crp": crp}, b)
        clip = self._clip(clip_text_pooled, clip_text, clip_img)

        c0 = cfg.block_out_channels[0]
        x = pixel_unshuffle(sample.astype(dt), cfg.patch_size)
        x = layer_norm(conv(c0, 1, "embedding_1", dt, pdt)(x))
        size = x.shape[1:3]
        if effnet is not None:  # resized first, then mapped
            x = x + conv_mapper(resize_bilinear(effnet, size), "effnet_mapper", c0, dt, pdt)
        if cfg.pixel_mapper_in_channels is not None:  # mapped first, then resized
            if pixels is None:
                pixels = jnp.zeros((b, 8, 8, cfg.pixel_mapper_in_channels), dt)
            x = x + resize_bilinear(conv_mapper(pixels, "pixels_mapper", c0, dt, pdt), size).astype(dt)

        def args(block: nn.Module, skip: jax.Array | None) -> tuple:  # a block's inputs after x
            if isinstance(block, ResBlockStageB):
                return skip, deterministic
            return (clip, deterministic) if isinstance(block, AttnBlock) else (r_embed,)

        ctl = None if control is None else _ControlFeed(control)
        x = self._up(self._down(x, args, deterministic, ctl), args, deterministic, ctl)
        if ctl is not None:
            ctl.check_consumed()
        out = conv(cfg.out_channels * cfg.patch_size**2, 1, "clf_1", dt, pdt, zero_init=True)(layer_norm(x))
        return pixel_shuffle(out, cfg.patch_size).astype(sample.dtype)

    # ------------------------------------------------------------------ conditioning

    def _timestep_embedding(self, r: jax.Array, values: dict[str, Any], b: int) -> jax.Array:
        """[embed(r), embed(cond) for each timestep_conditioning_type] → [B, c_r · (1 + #conds)] float32."""
        c_r = self.config.timestep_ratio_embedding_dim
        parts = [timestep_embedding(_per_sample(r, b, "timestep_ratio"), c_r)]
        for name in self.config.timestep_conditioning_type:
            value = values.get(name)
            cond = jnp.zeros((b,), jnp.float32) if value is None else _per_sample(value, b, name)
            parts.append(timestep_embedding(cond, c_r))
        return jnp.concatenate(parts, axis=1)

    def _clip(self, pooled: jax.Array, text: jax.Array | None, img: jax.Array | None) -> jax.Array:
        """The attention conditioning [B, S, conditioning_dim]: [text states, pooled tokens, image tokens], each
        pooled / image embedding mapped to `clip_seq` tokens, LayerNorm without affine."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype

        def tokens(x: jax.Array, name: str) -> jax.Array:  # [B, n, C] → [B, n · clip_seq, conditioning_dim]
            x = x[:, None] if x.ndim == 2 else x
            y = dense(cfg.conditioning_dim * cfg.clip_seq, name, dt, pdt, axes=(None, EMBED))(x.astype(dt))
            return y.reshape(x.shape[0], x.shape[1] * cfg.clip_seq, cfg.conditioning_dim)

        clip = tokens(pooled, "clip_txt_pooled_mapper")
        if text is not None:
            text = dense(cfg.conditioning_dim, "clip_txt_mapper", dt, pdt, axes=(None, EMBED))(text.astype(dt))
            clip = jnp.concatenate([text, clip, tokens(img, "clip_img_mapper")], axis=1)
        return layer_norm(clip)

    # ------------------------------------------------------------------ levels

    def _block(self, kind: str, level: int, c_skip: int, name: str | None) -> nn.Module:
        """The child `name`, or with `name` None an unbound block to `apply` (the repeats' functional path)."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        c, drop = cfg.block_out_channels[level], cfg.level_dropout[level]
        kw = dict(name=name) if name is not None else dict(parent=None)
        if kind == RES:
            return ResBlockStageB(c, c_skip, cfg.kernel_size, drop, dt, pdt, **kw)
        if kind == ATTN:
            heads, self_attn = cfg.num_attention_heads[level], cfg.level_self_attn[level]
            return AttnBlock(c, cfg.conditioning_dim, heads, self_attn, drop, dt, pdt, **kw)
        return TimestepBlock(c, dt, pdt, cfg.timestep_conditioning_type, **kw)

    def _level(self, prefix: str, level: int, n_layers: int, takes_skip: bool, args, deterministic: bool, ctl) -> Any:
        """A function x, skip → x running `n_layers` repeats of the level's block sequence (children `prefix_0`
        ...). Its modules are created here, once, so that the passes of a repeat mapper share them."""
        cfg = self.config
        kinds = cfg.block_types_per_layer[level]
        functional = (self.scan_blocks or self.remat) and not self.is_initializing()
        own = min(n_layers, int(takes_skip)) if functional else n_layers  # repeats run as bound modules
        c_skip = cfg.block_out_channels[level]
        modules = [
            self._block(kind, level, c_skip if takes_skip and j == 0 else 0, f"{prefix}_{j}")
            for j, kind in enumerate(kinds * own)
        ]
        names = [[f"{prefix}_{r * len(kinds) + k}" for k in range(len(kinds))] for r in range(own, n_layers)]
        unbound = [self._block(kind, level, 0, None) for kind in kinds]
        kw = dict(scan=self.scan_blocks, remat=self.remat, deterministic=deterministic)

        def run(x: jax.Array, skip: jax.Array | None) -> jax.Array:
            for j, block in enumerate(modules):
                if ctl is not None and isinstance(block, ResBlockStageB):
                    x = ctl.add(x)
                x = block(x, *args(block, skip if j == 0 else None))
            if names and ctl is None:
                x = apply_repeats(self, x, names, unbound, lambda block: args(block, None), **kw)
            elif names:  # a control entry splits the functional repeats before its repeat
                for segment, entry in ctl.segments(names, kinds):
                    x = x if entry is None else ctl.add(x, entry)
                    x = apply_repeats(self, x, segment, unbound, lambda block: args(block, None), **kw)
            return x

        return run

    def _down(self, x: jax.Array, args, deterministic: bool, ctl) -> list[jax.Array]:
        """The down levels; returns their outputs, deepest first."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        outputs = []
        for i, c in enumerate(cfg.block_out_channels):
            if i > 0:
                name = f"down_downscalers_{i}_1"
                if cfg.switch_level is None:
                    scaler = conv(c, 2, name, dt, pdt, stride=2)
                else:
                    scaler = UpDownBlock2d(c, "down", cfg.switch_level[i - 1], dt, pdt, name=name)
                x = scaler(layer_norm(x))
            run = self._level(f"down_blocks_{i}", i, cfg.down_num_layers_per_block[i], False, args, deterministic, ctl)
            for p in range(cfg.down_blocks_repeat_mappers[i]):
                if p > 0:
                    x = conv(c, 1, f"down_repeat_mappers_{i}_{p - 1}", dt, pdt)(x)
                x = run(x, None)
            outputs.insert(0, x)
        return outputs

    def _up(self, outputs: list[jax.Array], args, deterministic: bool, ctl) -> jax.Array:
        """The up levels from the deepest; the first ResBlock of each later level takes that level's down output
        (x first resized to it, bilinear, where a halving rounded down) on every repeat-mapper pass."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        n = cfg.num_levels
        x = outputs[0]
        for u in range(n):
            i = n - 1 - u
            n_layers = cfg.up_num_layers_per_block[u]
            takes_skip = u > 0 and n_layers > 0 and cfg.block_types_per_layer[i][0] == RES
            skip = outputs[u] if takes_skip else None
            run = self._level(f"up_blocks_{u}", i, n_layers, takes_skip, args, deterministic, ctl)
            for p in range(cfg.up_blocks_repeat_mappers[u]):
                if p > 0:
                    x = conv(cfg.block_out_channels[i], 1, f"up_repeat_mappers_{u}_{p - 1}", dt, pdt)(x)
                if skip is not None and x.shape[1:3] != skip.shape[1:3]:
                    x = resize_bilinear(x, skip.shape[1:3]).astype(dt)
                x = run(x, skip)
            if i > 0:
                c, name = cfg.block_out_channels[i - 1], f"up_upscalers_{u}_1"
                if cfg.switch_level is None:
                    scaler = conv_transpose(c, 2, 2, 0, name, dt, pdt)
                else:
                    scaler = UpDownBlock2d(c, "up", cfg.switch_level[i - 1], dt, pdt, name=name)
                x = scaler(layer_norm(x))
        return x


class _ControlFeed:
    """Hands out `control` entries in ResBlock order (the original's `ControlNetDeliverer`), at trace time."""

    def __init__(self, control: Sequence[jax.Array | None]):
        self.entries, self.n = tuple(control), 0

    def take(self) -> jax.Array | None:
        entry = self.entries[self.n] if self.n < len(self.entries) else None
        self.n += 1
        return entry

    def add(self, x: jax.Array, taken: tuple[int, jax.Array] | None = None) -> jax.Array:
        """x [B, H, W, C] plus the next entry (or `taken`: an (index, entry) taken before), resized to H, W."""
        n, c = taken if taken is not None else (self.n, self.take())
        if c is None:
            return x
        if c.ndim != 4 or c.shape[-1] != x.shape[-1] or c.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"StableCascadeUNet: control[{n}] must be [{x.shape[0]} or 1, h, w, {x.shape[-1]}] (ResBlock {n}'s "
                f"channels), got {c.shape}"
            )
        return x + resize_bilinear(c, x.shape[1:3]).astype(x.dtype)

    def segments(self, names: list[list[str]], kinds: tuple[str, ...]) -> list[tuple[list[list[str]], Any]]:
        """The functional repeats `names` split into runs, each with the entry added before it (or None)."""
        out: list[tuple[list[list[str]], Any]] = []
        for rep in names:
            entries = [self.take() for kind in kinds if kind == RES]
            if any(e is not None for e in entries):
                if kinds[0] != RES or len(entries) != 1:
                    raise NotImplementedError(
                        "StableCascadeUNet: control with scan_blocks / remat needs one ResBlock first in each "
                        f"repeat of a level, got {kinds}"
                    )
                out.append(([rep], (self.n - 1, entries[0])))
            elif out:
                out[-1][0].append(rep)
            else:
                out.append(([rep], None))
        return out

    def check_consumed(self) -> None:
        late = [i for i, c in enumerate(self.entries) if c is not None and i >= self.n]
        if late:
            raise ValueError(f"StableCascadeUNet: control entries {late} are past the network's {self.n} ResBlocks")


def _per_sample(value: Any, b: int, name: str) -> jax.Array:
    """A scalar or [B] (or [1]) value as a float32 [B]."""
    value = jnp.asarray(value, jnp.float32)
    if value.shape not in ((), (1,), (b,)):
        raise ValueError(f"StableCascadeUNet: {name} must be a scalar or have shape [{b}], got {value.shape}")
    return jnp.broadcast_to(value.reshape(-1) if value.ndim else value, (b,))


def check_inputs(cfg: StableCascadeUNetConfig, sample, pooled, text, img, effnet, pixels, **conds) -> None:
    """Raise one ValueError naming the input and what the config expects (shapes are static)."""
    err = lambda msg: ValueError(f"StableCascadeUNet: {msg}")  # noqa: E731
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
        raise err(f"sample must be [B, H, W, {cfg.in_channels}], got {sample.shape}")
    _, h, w, _ = sample.shape
    if h % cfg.patch_size or w % cfg.patch_size or min(h, w) < cfg.downscale:
        raise err(
            f"sample's H and W must be multiples of patch_size={cfg.patch_size} and at least {cfg.downscale} "
            f"(one pixel at the deepest level), got {h}x{w}"
        )
    if pooled.ndim not in (2, 3) or pooled.shape[-1] != cfg.clip_text_pooled_in_channels:
        raise err(f"clip_text_pooled must be [B, 1, {cfg.clip_text_pooled_in_channels}], got {pooled.shape}")
    if (text is None) != (img is None):
        raise err("pass clip_text and clip_img together (zeros [B, 1, C] for no image), or neither")
    optional = (
        ("clip_text", text, cfg.clip_text_in_channels, (3,)),
        ("clip_img", img, cfg.clip_image_in_channels, (2, 3)),
        ("effnet", effnet, cfg.effnet_in_channels, (4,)),
        ("pixels", pixels, cfg.pixel_mapper_in_channels, (4,)),
    )
    for name, x, channels, ndims in optional:
        if x is None:
            continue
        if channels is None:
            raise err(f"{name} was given, but this config has no mapper for it ({name} channels are None)")
        if x.ndim not in ndims or x.shape[-1] != channels:
            raise err(f"{name} must have {ndims[-1]} dimensions with {channels} channels last, got {x.shape}")
    for name, value in conds.items():
        if value is not None and name not in cfg.timestep_conditioning_type:
            raise err(f"{name} was given, but timestep_conditioning_type is {cfg.timestep_conditioning_type}")


def example_inputs(config: StableCascadeUNetConfig) -> tuple[jax.ShapeDtypeStruct | None, ...]:
    """The smallest positional inputs that create every parameter (shapes of parameters do not depend on them)."""
    s, f32, n = jax.ShapeDtypeStruct, jnp.float32, config.downscale
    inputs = [
        s((1, n, n, config.in_channels), f32),
        s((1,), f32),
        s((1, 1, config.clip_text_pooled_in_channels), f32),
        None if config.clip_text_in_channels is None else s((1, 1, config.clip_text_in_channels), f32),
        None if config.clip_image_in_channels is None else s((1, 1, config.clip_image_in_channels), f32),
        None if config.effnet_in_channels is None else s((1, 1, 1, config.effnet_in_channels), f32),
    ]
    while inputs[-1] is None:  # pixels are never needed: zeros create the pixel mapper
        inputs.pop()
    return tuple(inputs)


def abstract_params(config: StableCascadeUNetConfig, param_dtype: Any = jnp.float32) -> Any:
    """The parameter tree as ShapeDtypeStructs (`jax.eval_shape` of init: nothing is allocated), unboxed."""
    module = StableCascadeUNet(config, param_dtype=param_dtype)
    tree = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *example_inputs(config))
    return nn.meta.unbox(tree)["params"]


def param_count(config: StableCascadeUNetConfig) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_params(config)))
