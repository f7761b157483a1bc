"""`StableCascadeUNetConfig`: the hyper-parameters of diffusers' `StableCascadeUNet` (stage C and stage B).

Field names and defaults are diffusers' config keys, so a `config.json` maps onto it key by key. Lists (as JSON
gives them, nested for `block_types_per_layer`) are normalised to tuples so the config stays hashable (a Flax
module attribute and a jit static argument).
"""

from __future__ import annotations

import dataclasses
import re

RES, TIMESTEP, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
BLOCK_TYPES = (RES, TIMESTEP, ATTN)

_PER_LEVEL = (
    "num_attention_heads",
    "down_num_layers_per_block",
    "up_num_layers_per_block",
    "down_blocks_repeat_mappers",
    "up_blocks_repeat_mappers",
    "block_types_per_layer",
)


def _tuple(value):
    """Lists → tuples, recursively (a string stays a string)."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class StableCascadeUNetConfig:
    """diffusers `StableCascadeUNet` config. Per-level fields are indexed by level (0 = full resolution), except
    `up_num_layers_per_block` and `up_blocks_repeat_mappers`, which diffusers lists in up order (deepest first)."""

    in_channels: int = 16
    out_channels: int = 16
    timestep_ratio_embedding_dim: int = 64
    patch_size: int = 1
    conditioning_dim: int = 2048
    block_out_channels: tuple[int, ...] = (2048, 2048)
    num_attention_heads: tuple[int, ...] = (32, 32)
    down_num_layers_per_block: tuple[int, ...] = (8, 24)
    up_num_layers_per_block: tuple[int, ...] = (24, 8)
    down_blocks_repeat_mappers: tuple[int, ...] | None = (1, 1)
    up_blocks_repeat_mappers: tuple[int, ...] | None = (1, 1)
    block_types_per_layer: tuple[tuple[str, ...], ...] = ((RES, TIMESTEP, ATTN), (RES, TIMESTEP, ATTN))
    clip_text_in_channels: int | None = None
    clip_text_pooled_in_channels: int = 1280
    clip_image_in_channels: int | None = None
    clip_seq: int = 4
    effnet_in_channels: int | None = None
    pixel_mapper_in_channels: int | None = None
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = (0.1, 0.1)
    self_attn: bool | tuple[bool, ...] = True
    timestep_conditioning_type: tuple[str, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _tuple(getattr(self, field.name)))
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("StableCascadeUNetConfig.block_out_channels needs at least one level")
        for name in ("down_blocks_repeat_mappers", "up_blocks_repeat_mappers"):
            if getattr(self, name) is None:  # diffusers' type allows None but its forward then has no levels
                object.__setattr__(self, name, (1,) * n)
        for name in _PER_LEVEL:
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"StableCascadeUNetConfig.{name} has {len(getattr(self, name))} entries; it needs {n}, "
                    f"one per level of block_out_channels={self.block_out_channels}"
                )
        for name in ("dropout", "self_attn"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"StableCascadeUNetConfig.{name} needs one value or {n} (one per level), got {value}")
        if self.switch_level is not None and len(self.switch_level) != n - 1:
            raise ValueError(
                f"StableCascadeUNetConfig.switch_level needs {n - 1} entries (one per downsampling), "
                f"got {self.switch_level}"
            )
        self._check_levels()
        self._check_sizes()

    def _check_levels(self) -> None:
        for level, kinds in enumerate(self.block_types_per_layer):
            unknown = [k for k in kinds if k not in BLOCK_TYPES]
            if unknown:
                raise ValueError(
                    f"StableCascadeUNetConfig.block_types_per_layer[{level}]: unknown block type(s) {unknown}; "
                    f"expected {BLOCK_TYPES}"
                )
            c, heads = self.block_out_channels[level], self.num_attention_heads[level]
            if ATTN in kinds and (heads < 1 or c % heads):
                raise ValueError(
                    f"StableCascadeUNetConfig: level {level} has attention, so num_attention_heads[{level}]={heads} "
                    f"must be >= 1 and divide block_out_channels[{level}]={c}"
                )
        for name in ("down_num_layers_per_block", "up_num_layers_per_block"):
            if any(v < 0 for v in getattr(self, name)):
                raise ValueError(f"StableCascadeUNetConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("down_blocks_repeat_mappers", "up_blocks_repeat_mappers"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(
                    f"StableCascadeUNetConfig.{name} must be >= 1 (1 = no repeat), got {getattr(self, name)}"
                )
        for cond in self.timestep_conditioning_type:
            # it names the parameter `mapper_{cond}`: a trailing `_<digits>` would read back as a list index
            if not isinstance(cond, str) or not cond.isidentifier() or re.search(r"_\d+$", cond):
                raise ValueError(f"StableCascadeUNetConfig.timestep_conditioning_type: invalid name {cond!r}")

    def _check_sizes(self) -> None:
        if (self.clip_text_in_channels is None) != (self.clip_image_in_channels is None):
            # diffusers' forward uses the text mapper only together with the image mapper
            raise ValueError(
                "StableCascadeUNetConfig: clip_text_in_channels and clip_image_in_channels are both set (stage C) "
                f"or both None (stage B), got {self.clip_text_in_channels} and {self.clip_image_in_channels}"
            )
        if self.timestep_ratio_embedding_dim < 4:  # the embedding divides by half_dim - 1
            raise ValueError(
                "StableCascadeUNetConfig.timestep_ratio_embedding_dim must be >= 4, "
                f"got {self.timestep_ratio_embedding_dim}"
            )
        if self.patch_size < 1 or self.clip_seq < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(
                "StableCascadeUNetConfig: patch_size and clip_seq must be >= 1 and kernel_size odd, got "
                f"{self.patch_size}, {self.clip_seq}, {self.kernel_size}"
            )

    # ------------------------------------------------------------------ derived values

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def level_dropout(self) -> tuple[float, ...]:
        d = self.dropout
        return tuple(float(v) for v in d) if isinstance(d, tuple) else (float(d),) * self.num_levels

    @property
    def level_self_attn(self) -> tuple[bool, ...]:
        s = self.self_attn
        return tuple(bool(v) for v in s) if isinstance(s, tuple) else (bool(s),) * self.num_levels

    def halves(self, level: int) -> bool:
        """Whether entering `level` (> 0) halves the resolution (strided conv, or bilinear if switch_level)."""
        return self.switch_level is None or bool(self.switch_level[level - 1])

    @property
    def downscale(self) -> int:
        """The smallest latent side that keeps every level at least one pixel: patch_size · 2^(halvings)."""
        return self.patch_size * 2 ** sum(self.halves(i) for i in range(1, self.num_levels))

    # ------------------------------------------------------------------ presets

    @classmethod
    def stage_c(cls) -> StableCascadeUNetConfig:
        """The released stage C prior (3,589,103,632 parameters)."""
        return cls(clip_text_in_channels=1280, clip_image_in_channels=768, switch_level=(False,))

    @classmethod
    def stage_c_lite(cls) -> StableCascadeUNetConfig:
        """The released stage C lite prior (1,030,785,040 parameters)."""
        return dataclasses.replace(
            cls.stage_c(),
            conditioning_dim=1536,
            block_out_channels=(1536, 1536),
            num_attention_heads=(24, 24),
            down_num_layers_per_block=(4, 12),
            up_num_layers_per_block=(12, 4),
        )

    @classmethod
    def stage_b(cls) -> StableCascadeUNetConfig:
        """The released stage B decoder (1,562,941,136 parameters)."""
        return cls(
            in_channels=4,
            out_channels=4,
            patch_size=2,
            conditioning_dim=1280,
            block_out_channels=(320, 640, 1280, 1280),
            num_attention_heads=(0, 0, 20, 20),
            down_num_layers_per_block=(2, 6, 28, 6),
            up_num_layers_per_block=(6, 28, 6, 2),
            down_blocks_repeat_mappers=(1, 1, 1, 1),
            up_blocks_repeat_mappers=(3, 3, 2, 2),
            block_types_per_layer=((RES, TIMESTEP), (RES, TIMESTEP), (RES, TIMESTEP, ATTN), (RES, TIMESTEP, ATTN)),
            effnet_in_channels=16,
            pixel_mapper_in_channels=3,
            dropout=(0.0, 0.0, 0.1, 0.1),
            timestep_conditioning_type=("sca",),
        )

    @classmethod
    def stage_b_lite(cls) -> StableCascadeUNetConfig:
        """The released stage B lite decoder (699,471,248 parameters)."""
        return dataclasses.replace(
            cls.stage_b(),
            block_out_channels=(320, 576, 1152, 1152),
            num_attention_heads=(0, 9, 18, 18),
            down_num_layers_per_block=(2, 4, 14, 4),
            up_num_layers_per_block=(4, 14, 4, 2),
            up_blocks_repeat_mappers=(2, 2, 2, 2),
        )

    @classmethod
    def tiny_prior(cls) -> StableCascadeUNetConfig:
        """A stage-C-shaped prior for tests: two levels at one resolution, text + pooled + image conditioning."""
        return dataclasses.replace(
            cls.stage_c(),
            timestep_ratio_embedding_dim=8,
            conditioning_dim=24,
            block_out_channels=(16, 24),
            num_attention_heads=(2, 3),
            down_num_layers_per_block=(1, 2),
            up_num_layers_per_block=(2, 1),
            clip_text_in_channels=12,
            clip_text_pooled_in_channels=12,
            clip_image_in_channels=10,
            clip_seq=2,
        )

    @classmethod
    def tiny(cls) -> StableCascadeUNetConfig:
        """The registry's smallest example (every component kind has one): `tiny_decoder`, which has every mapper
        but the image one."""
        return cls.tiny_decoder()

    @classmethod
    def tiny_decoder(cls) -> StableCascadeUNetConfig:
        """A stage-B-shaped decoder for tests: three levels, attention at the deepest two, up repeat mappers."""
        return cls(
            in_channels=4,
            out_channels=4,
            timestep_ratio_embedding_dim=8,
            patch_size=2,
            conditioning_dim=16,
            block_out_channels=(8, 16, 16),
            num_attention_heads=(0, 2, 2),
            down_num_layers_per_block=(1, 2, 2),
            up_num_layers_per_block=(2, 2, 1),
            down_blocks_repeat_mappers=(1, 1, 1),
            up_blocks_repeat_mappers=(2, 2, 1),
            block_types_per_layer=((RES, TIMESTEP), (RES, TIMESTEP, ATTN), (RES, TIMESTEP, ATTN)),
            clip_text_pooled_in_channels=12,
            clip_seq=2,
            effnet_in_channels=16,
            pixel_mapper_in_channels=3,
            dropout=(0.0, 0.1, 0.1),
            timestep_conditioning_type=("sca",),
        )
