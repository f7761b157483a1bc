"""wurst_jax: Würstchen text-to-image in JAX/Flax.

The public surface: the text-to-image pipelines (Würstchen v2 and Stable Cascade), the stage modules and their
configs (and the EfficientNet semantic encoder the stages were trained on), `load_component` /
`convert_state_dict` for PyTorch weights, and `WeightsError`, the exception every weight problem raises.
"""

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
