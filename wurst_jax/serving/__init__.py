"""Many images at once: `wurst-jax generate --prompts FILE` (resumable batch jobs) and `wurst-jax serve` (an HTTP
API with dynamic batching).

- `backend`: the only place that knows the model: `ModelSpec` (a model's folders read without loading weights,
  and loading the pipeline) and `generate_images` (one batch through any pipeline with diffusers' argument names).
- `jobs`: request fields and prompt files checked into `ImageJob`s, grouped into batches of one compiled shape,
  and `results.jsonl` read back for resuming.
- `batch`: the batch command (signals, progress, atomic PNGs, multi-host).
- `server`: the dynamic batcher and the Starlette app (needs the `serve` extra).
"""

from wurst_jax.serving.backend import ModelSpec, Row, Settings, generate_images
from wurst_jax.serving.jobs import ImageJob, parse_prompt_file, plan_batches

__all__ = ["ImageJob", "ModelSpec", "Row", "Settings", "generate_images", "parse_prompt_file", "plan_batches"]
