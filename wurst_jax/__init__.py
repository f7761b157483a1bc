"""wurst_jax: Würstchen text-to-image in JAX/Flax.

The public surface: the text-to-image pipelines (Würstchen v2 and Stable Cascade), the stage modules and their
configs (and the EfficientNet semantic encoder the stages were trained on), `load_component` /
`convert_state_dict` for PyTorch weights, and `WeightsError`, the exception every weight problem raises.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Lazy re-exports: `import wurst_jax` costs milliseconds and imports neither jax nor flax; a name's module is
# imported the first time the name is used (`wj.WuerstchenPipeline`), so a command pays only for what it needs.
_EXPORTS = {
    "wurst_jax.models": (
        "CLIPTextConfig",
        "CLIPTextModel",
        "EfficientNetConfig",
        "EfficientNetEncoder",
        "PaellaVQModel",
        "StageAConfig",
        "StageBConfig",
        "StageCConfig",
        "WuerstchenDiffNeXt",
        "WuerstchenPrior",
    ),
    "wurst_jax.pipelines": (
        "ImagePipelineOutput",
        "StableCascadeCombinedPipeline",
        "StableCascadeDecoderPipeline",
        "StableCascadePriorPipeline",
        "StableCascadePriorPipelineOutput",
        "WuerstchenDecoderPipeline",
        "WuerstchenPipeline",
        "WuerstchenPriorPipeline",
        "WuerstchenPriorPipelineOutput",
        "enable_compilation_cache",
    ),
    "wurst_jax.samplers": ("DEFAULT_STAGE_C_TIMESTEPS",),
    "wurst_jax.sharding": ("initialize_distributed", "make_mesh"),
    "wurst_jax.weights": ("WeightsError", "convert_state_dict", "export_component", "load_component"),
    "wurst_jax.weights.converted": ("convert_checkpoint",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from wurst_jax.models import (
        CLIPTextConfig,
        CLIPTextModel,
        EfficientNetConfig,
        EfficientNetEncoder,
        PaellaVQModel,
        StageAConfig,
        StageBConfig,
        StageCConfig,
        WuerstchenDiffNeXt,
        WuerstchenPrior,
    )
    from wurst_jax.pipelines import (
        ImagePipelineOutput,
        StableCascadeCombinedPipeline,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
        StableCascadePriorPipelineOutput,
        WuerstchenDecoderPipeline,
        WuerstchenPipeline,
        WuerstchenPriorPipeline,
        WuerstchenPriorPipelineOutput,
        enable_compilation_cache,
    )
    from wurst_jax.samplers import DEFAULT_STAGE_C_TIMESTEPS
    from wurst_jax.sharding import initialize_distributed, make_mesh
    from wurst_jax.weights import WeightsError, convert_state_dict, export_component, load_component
    from wurst_jax.weights.converted import convert_checkpoint


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'wurst_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STAGE_C_TIMESTEPS",
    "ImagePipelineOutput",
    "StableCascadeCombinedPipeline",
    "StableCascadeDecoderPipeline",
    "StableCascadePriorPipeline",
    "StableCascadePriorPipelineOutput",
    "WuerstchenDecoderPipeline",
    "WuerstchenPipeline",
    "WuerstchenPriorPipeline",
    "WuerstchenPriorPipelineOutput",
    "enable_compilation_cache",
    "initialize_distributed",
    "make_mesh",
    "CLIPTextConfig",
    "CLIPTextModel",
    "EfficientNetConfig",
    "EfficientNetEncoder",
    "PaellaVQModel",
    "StageAConfig",
    "StageBConfig",
    "StageCConfig",
    "WeightsError",
    "WuerstchenDiffNeXt",
    "WuerstchenPrior",
    "convert_checkpoint",
    "convert_state_dict",
    "export_component",
    "load_component",
]
