"""Pipelines: prompts (and images) in, images out, one compiled denoising loop per stage.

- `wuerstchen.py`: Würstchen v2's prior, decoder and combined pipelines (diffusers' argument names).
- `cascade_prior.py`, `cascade.py`: Stable Cascade's (v3) prior (text and image variation), decoder and combined.
- shared by every pipeline: `runner.py` (the stage runner: initial latents → `denoise_loop` → latents on the
  device), `text.py` (prompts → text states, Compel weighting from `prompts.py`), `random.py` (per-image keys and
  named streams), `components.py` (pipeline folders → components, model offloading), `runtime.py` (the compile
  cache each pipeline owns, memory figures), `args.py` (argument checks), `outputs.py`.
A new model family adds one file here with its pipelines, built from the same pieces.
"""

from wurst_jax.pipelines.cascade import StableCascadeCombinedPipeline, StableCascadeDecoderPipeline
from wurst_jax.pipelines.cascade_prior import StableCascadePriorPipeline
from wurst_jax.pipelines.outputs import (
    ImagePipelineOutput,
    StableCascadePriorPipelineOutput,
    WuerstchenPriorPipelineOutput,
)
from wurst_jax.pipelines.runtime import enable_compilation_cache, peak_device_memory
from wurst_jax.pipelines.wuerstchen import WuerstchenDecoderPipeline, WuerstchenPipeline, WuerstchenPriorPipeline

__all__ = [
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
    "peak_device_memory",
]
