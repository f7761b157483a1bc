"""The component registry: the one place that names every kind of component wurst_jax can build, load, convert,
export, shard and train.

A `ComponentSpec` says, for one kind: its Flax module and config classes, the diffusers / transformers class names
whose folders load as it, the weights file stem, the source keys dropped on load, the head counts tensor
parallelism must split, the tensor names that identify its original single-file checkpoints and how their config
is read off them, and the smallest inputs that create every parameter. Loading (`weights/load.py`), conversion
(`weights/converted.py`), export (`weights/export.py`), sharding checks (`sharding.py`) and fine-tuning read it.
Adding a component kind is one `register(ComponentSpec(...))` here plus the module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import cascade, clip_text, clip_vision
from wurst_jax.models.cascade import controlnet
from wurst_jax.models.cascade.config import ATTN
from wurst_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from wurst_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from wurst_jax.models.effnet import EfficientNetConfig, EfficientNetEncoder
from wurst_jax.models.wuerstchen import (
    PaellaVQModel,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
)

Shapes = Mapping[str, tuple[int, ...]]  # tensor name (wrapper prefixes removed) → shape


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """Everything the rest of wurst_jax needs to know about one kind of component."""

    kind: str  # the registry key ("prior", "decoder", ...)
    module: type[nn.Module]
    config: type  # a frozen dataclass whose field names are the diffusers / transformers config keys
    class_names: tuple[str, ...]  # config.json `_class_name` / `architectures` that load as this kind; [0] is exported
    example_inputs: Callable[[Any], tuple[jax.ShapeDtypeStruct, ...]]  # config → inputs creating every parameter
    library: str = "diffusers"  # who reads the exported folder: "diffusers" or "transformers"
    model_type: str | None = None  # transformers' `model_type` (also identifies a folder)
    folder: str = ""  # the component folder it usually lives in inside a pipeline folder
    ignore: tuple[str, ...] = ()  # regexes of source keys dropped silently on load (buffers)
    root: str = ""  # a top-level module name some writers omit (transformers ≥ 5 saves CLIP without it)
    heads: Callable[[Any], Sequence[int]] = lambda config: ()  # attention head counts tensor parallelism splits
    markers: tuple[str, ...] = ()  # regexes of tensor names only this kind's checkpoints have
    stages: tuple[str, ...] = ()  # the names `convert --stage` takes for its original single files (none: no such file)
    stage_of: Callable[[Shapes], str] | None = None  # which of `stages` a file's tensors are (None: any of them)
    infer_config: Callable[[Shapes], Any] | None = None  # a single file's config from its tensors (None: default)
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement): this kind's original tensor names → diffusers'
    released: tuple[str, ...] = ()  # config presets of the released models: they bound config.json (models/bounds.py)
    blocks: Callable[[Any], int] | None = None  # how many blocks a config builds and runs, bounded the same way

    @property
    def weights_stem(self) -> str:
        return "model" if self.library == "transformers" else "diffusion_pytorch_model"

    def build(self, config: Any, dtype: Any = jnp.float32, param_dtype: Any = None) -> nn.Module:
        return self.module(config, dtype=dtype, param_dtype=param_dtype or dtype)

    def single_file_config(self, shapes: Shapes) -> Any:
        """The config of an original single-file checkpoint with these tensors (no config.json beside it)."""
        return self.infer_config(shapes) if self.infer_config else self.config()

    def detects(self, keys: Sequence[str]) -> list[str]:
        """For each of `markers` that some key matches, the first such key."""
        found = (next((k for k in keys if re.search(m, k)), None) for m in self.markers)
        return [k for k in found if k is not None]


_REGISTRY: dict[str, ComponentSpec] = {}


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.kind in _REGISTRY:
        raise ValueError(f"component kind {spec.kind!r} is registered twice")
    _REGISTRY[spec.kind] = spec
    return spec


def kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def specs() -> tuple[ComponentSpec, ...]:
    return tuple(_REGISTRY.values())


def get(kind: str) -> ComponentSpec:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {kinds()}")
    return _REGISTRY[kind]


def for_module(module: nn.Module) -> ComponentSpec:
    """The spec of a module instance (its exact class)."""
    spec = next((s for s in _REGISTRY.values() if type(module) is s.module), None)
    if spec is None:
        raise TypeError(f"not a wurst_jax model: {type(module).__name__}")
    return spec


def for_class_names(names: Sequence[str | None]) -> ComponentSpec | None:
    """The spec a config.json names (its `_class_name`, `architectures` entries or `model_type`), if any."""
    for name in names:
        for spec in _REGISTRY.values():
            if name in spec.class_names or (name is not None and name == spec.model_type):
                return spec
    return None


def class_names() -> tuple[str, ...]:
    return tuple(n for s in _REGISTRY.values() for n in s.class_names)


def single_file_stages() -> tuple[str, ...]:
    """The `--stage` names of the kinds that have original single-file checkpoints, in registry order."""
    return tuple(dict.fromkeys(stage for s in _REGISTRY.values() for stage in s.stages))


def detect(keys: Sequence[str]) -> tuple[ComponentSpec, str] | None:
    """(spec, an identifying tensor name) of the kind a set of tensor names (prefixes removed) belongs to: the kind
    with the most markers matched, so a kind whose markers extend another's wins on its own checkpoints."""
    hits = [
        (len(found), -i, spec, found[0]) for i, spec in enumerate(_REGISTRY.values()) if (found := spec.detects(keys))
    ]
    if not hits:
        return None
    _, _, spec, key = max(hits, key=lambda h: h[:2])  # the most markers matched; ties: the first registered
    return spec, key


# ---------------------------------------------------------------------------------------------------------------
# the kinds


def _s(*shape: int, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _effnet_config(shapes: Shapes) -> EfficientNetConfig:
    """EfficientNetV2-S or -L (the -L backbone has a 9th part, `backbone.8`), mapper BatchNorm affine or not."""
    large = any(k.startswith("backbone.8.") for k in shapes)
    return EfficientNetConfig(
        effnet="efficientnet_v2_l" if large else "efficientnet_v2_s", mapper_affine="mapper.1.weight" in shapes
    )


def _cascade_heads(c: cascade.StableCascadeUNetConfig) -> tuple[int, ...]:
    """Only the levels with attention blocks split heads (stage B's first levels have none and list 0)."""
    return tuple(h for h, t in zip(c.num_attention_heads, c.block_types_per_layer, strict=True) if ATTN in t and h > 0)


def _cascade_stage(shapes: Shapes) -> str:
    """Stage B has the effnet / pixels mappers; stage C has the text and image mappers."""
    return "stage_b" if any(k.startswith(("effnet_mapper.", "pixels_mapper.")) for k in shapes) else "stage_c"


_CASCADE_PRESETS = ("stage_c", "stage_c_lite", "stage_b", "stage_b_lite")


def _cascade_config(shapes: Shapes) -> cascade.StableCascadeUNetConfig:
    """The released preset whose level widths (each level's first depthwise conv) the file has: full or lite."""
    stage = _cascade_stage(shapes)
    widths = tuple(
        shapes[f"down_blocks.{i}.0.depthwise.weight"][0]
        for i in range(8)
        if f"down_blocks.{i}.0.depthwise.weight" in shapes
    )
    presets = [getattr(cascade.StableCascadeUNetConfig, p)() for p in _CASCADE_PRESETS if p.startswith(stage)]
    for config in presets:
        if config.block_out_channels == widths:
            return config
    known = ", ".join(f"{c.block_out_channels}" for c in presets)
    raise ValueError(
        f"a {stage} checkpoint with level widths {widths}, which no released model has ({known}); pass --config"
    )


def _cascade_blocks(c: cascade.StableCascadeUNetConfig) -> int:
    """Blocks run per call: each level's block types × its layers × its repeats, down and up."""
    per_level = zip(
        c.block_types_per_layer,
        c.down_num_layers_per_block,
        c.up_num_layers_per_block,
        c.down_blocks_repeat_mappers,
        c.up_blocks_repeat_mappers,
        strict=True,
    )
    return sum(
        len(types) * (down * down_repeat + up * up_repeat) for types, down, up, down_repeat, up_repeat in per_level
    )


def _heads(*counts: Any) -> tuple[int, ...]:
    flat = [c for x in counts for c in (x if isinstance(x, tuple) else (x,))]
    return tuple(c for c in flat if c and c > 0)


register(
    ComponentSpec(
        kind="prior",
        module=WuerstchenPrior,
        config=StageCConfig,
        class_names=("WuerstchenPrior",),
        example_inputs=lambda c: (_s(1, 4, 4, c.c_in), _s(1), _s(1, 4, c.c_cond)),
        folder="prior",
        heads=lambda c: _heads(c.nhead),
        markers=(r"^cond_mapper\.",),
        stages=("prior",),
        released=("v2",),
        blocks=lambda c: c.depth,
    )
)
register(
    ComponentSpec(
        kind="decoder",
        module=WuerstchenDiffNeXt,
        config=StageBConfig,
        class_names=("WuerstchenDiffNeXt",),
        example_inputs=lambda c: (
            _s(1, c.downscale, c.downscale, c.c_in),
            _s(1),
            _s(1, 4, 4, c.effnet_embd),
            _s(1, 4, c.clip_embd),
        ),
        folder="decoder",
        heads=lambda c: _heads(c.nhead),
        markers=(r"^(effnet_mappers|clip_mapper)\.",),
        stages=("decoder",),
        released=("v2",),
        blocks=lambda c: 2 * sum(n * len(t) for n, t in zip(c.blocks, c.level_config, strict=False)),
    )
)
register(
    ComponentSpec(
        kind="vqgan",
        module=PaellaVQModel,
        config=StageAConfig,
        class_names=("PaellaVQModel",),
        example_inputs=lambda c: (_s(1, *(2 * c.up_down_scale_factor * 2 ** (c.levels - 1),) * 2, c.in_channels),),
        folder="vqgan",
        markers=(r"^vquantizer\.",),
        stages=("vqgan", "stage_a"),  # Würstchen v2's and Stable Cascade's stage A: one architecture
        released=("v2",),
        blocks=lambda c: c.bottleneck_blocks + 2 * c.levels,
    )
)
register(
    ComponentSpec(
        kind="text_encoder",
        module=CLIPTextModel,
        config=CLIPTextConfig,
        class_names=("CLIPTextModel",),
        example_inputs=clip_text.example_inputs,
        library="transformers",
        model_type="clip_text_model",
        folder="text_encoder",
        ignore=(r"position_ids$", r"^text_projection\."),
        root="text_model.",
        heads=lambda c: _heads(c.num_attention_heads),
        markers=(r"(^|\.)token_embedding\.",),
        released=("vit_bigg", "vit_h"),
        blocks=lambda c: c.num_hidden_layers,
    )
)
register(
    ComponentSpec(
        kind="text_encoder_projection",
        module=CLIPTextModelWithProjection,
        config=CLIPTextConfig,
        class_names=("CLIPTextModelWithProjection",),
        example_inputs=clip_text.example_inputs,
        library="transformers",
        model_type="clip_text_model",  # shared with "text_encoder", which a bare model_type names first
        folder="text_encoder",
        ignore=(r"position_ids$",),
        heads=lambda c: _heads(c.num_attention_heads),
        markers=(r"(^|\.)token_embedding\.", r"^text_projection\."),  # all of text_encoder's, and more
        released=("vit_bigg", "vit_h"),
        blocks=lambda c: c.num_hidden_layers,
    )
)
register(
    ComponentSpec(
        kind="effnet",
        module=EfficientNetEncoder,
        config=EfficientNetConfig,
        class_names=("EfficientNetEncoder",),  # the class of diffusers' Würstchen training example
        example_inputs=lambda c: (_s(1, 32, 32, 3),),
        folder="effnet",
        markers=(r"^backbone\.\d+\.",),
        stages=("effnet", "effnet_encoder"),  # v2's semantic encoder; SC's effnet_encoder.safetensors
        infer_config=_effnet_config,
        released=("v2",),  # its block tables are fixed by name (`effnet`): only its widths are bounded
    )
)
register(
    ComponentSpec(
        kind="image_encoder",
        module=CLIPVisionModelWithProjection,
        config=CLIPVisionConfig,
        class_names=("CLIPVisionModelWithProjection",),
        example_inputs=clip_vision.example_inputs,
        library="transformers",
        model_type="clip_vision_model",
        folder="image_encoder",
        ignore=(r"position_ids$",),
        heads=lambda c: _heads(c.num_attention_heads),
        markers=(r"(^|\.)patch_embedding\.",),
        released=("vit_l14",),
        blocks=lambda c: c.num_hidden_layers,
    )
)
register(
    ComponentSpec(
        kind="cascade_unet",  # Stable Cascade's stage C (prior) and stage B (decoder): one class, two configs
        module=cascade.StableCascadeUNet,
        config=cascade.StableCascadeUNetConfig,
        class_names=("StableCascadeUNet",),
        example_inputs=cascade.example_inputs,
        folder="prior",
        heads=_cascade_heads,
        # the pooled-text mapper (the original stage B calls it clip_mapper, as v2's decoder does) and the per-level
        # down/up scalers, which neither Würstchen v2 model has: two markers outvote the v2 decoder's one
        markers=(r"^(clip_txt_pooled_mapper|effnet_mapper|pixels_mapper)\.", r"^(down_downscalers|up_upscalers)\."),
        stages=("stage_c", "stage_b"),  # stage_{c,b}{,_lite}{,_bf16}.safetensors of Stability-AI/StableCascade
        stage_of=_cascade_stage,
        infer_config=_cascade_config,
        renames=((r"^clip_mapper\.", "clip_txt_pooled_mapper."),),  # the original StageB's name
        released=("stage_c", "stage_c_lite", "stage_b", "stage_b_lite"),
        blocks=_cascade_blocks,
    )
)
register(
    ComponentSpec(
        kind="controlnet",  # Stable Cascade's stage C ControlNet (the original's canny / inpainting / sr files)
        module=controlnet.StableCascadeControlNet,
        config=controlnet.ControlNetConfig,
        class_names=("StableCascadeControlNet",),  # no diffusers class: our own name in exported config.json
        example_inputs=controlnet.example_inputs,
        folder="controlnet",
        markers=(r"^backbone\.\d+\.", r"^projections\.\d+\.\d+\.weight$"),  # effnet's marker and more
        stages=("controlnet",),
        infer_config=controlnet.infer_config,
        released=("canny", "inpainting", "sr", "identity"),
        blocks=lambda c: c.large_blocks + len(c.proj_blocks),
    )
)
