"""Stable Cascade configs of `generate_benchmark.py` (`--config sc | sc-lite | sc-tiny`): random weights, no folders.

`sc`: stage C + stage B (`StableCascadeUNetConfig.stage_c` / `stage_b`) + the Paella VQGAN (stage A, the same
network as Würstchen v2's) at 1024², with diffusers' StableCascade defaults (prior 20 steps, guidance 4; decoder 10
steps, no guidance). `sc-lite`: the lite presets. `sc-tiny`: `tiny_prior` / `tiny_decoder` for the CPU test.
Text encoder: a random CLIP ViT-bigG with projection for `sc` and `sc-lite` — stage C reads its 1280-wide states
and 1280-wide pooled embedding, and the step count of the tower is what costs, so nothing smaller is faithful;
`sc-tiny` a 1-layer tower of the tiny presets' width (12). No image encoder (text-to-image: zero image embeddings).

The timing goes through `StableCascadeCombinedPipeline` built from components (modules + initialised variables):
a warm-up call compiles every stage; then per rep the prior pipeline call (`prior` s: text encoding + the stage C
loop) and the decoder pipeline call on its latents (`decoder` s: pooled text + the stage B loop + VQGAN decode),
so `text` and `vqgan` have no separate figure (null). `compile_s` = warm-up call − median pipeline call.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import wurst_jax as wj
from wurst_jax.models.cascade import StableCascadeUNet
from wurst_jax.models.cascade.config import StableCascadeUNetConfig as UNetConfig
from wurst_jax.models.clip_text import CLIPTextModelWithProjection
from wurst_jax.pipelines.components import Component

CONFIGS = ("sc", "sc-lite", "sc-tiny")
DEFAULT_RES = {"sc": 1024, "sc-lite": 1024, "sc-tiny": 256}
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, 0.0
STEPS = (20, 10)  # prior, decoder: diffusers' StableCascade defaults (`--steps` overrides)
TEXT_ENCODER = {
    "sc": "random CLIP ViT-bigG with projection (stage C's 1280-wide states + pooled; the released encoder)",
    "sc-lite": "random CLIP ViT-bigG with projection (stage C lite reads the same 1280-wide states + pooled)",
    "sc-tiny": "random 1-layer CLIP with projection, width 12 (the tiny presets' text / pooled channels)",
}
NOTE = (
    "Stable Cascade (bench_cascade.py): prior s = prior pipeline call (text + stage C loop), decoder s = decoder "
    "pipeline call (pooled text + stage B loop + VQGAN); compile s = warm-up call − median pipeline call; "
    "text encoder per row (`text_encoder`); no FLOP count."
)


def configs(name: str) -> dict:
    """Stage configs of a Stable Cascade benchmark config (see the module docstring)."""
    if name in ("sc", "sc-lite"):
        lite = "_lite" if name == "sc-lite" else ""
        prior, decoder = getattr(UNetConfig, "stage_c" + lite)(), getattr(UNetConfig, "stage_b" + lite)()
        return dict(prior=prior, decoder=decoder, vqgan=wj.StageAConfig.v2(), text=wj.CLIPTextConfig.vit_bigg())
    if name == "sc-tiny":
        te = dataclasses.replace(wj.CLIPTextConfig.tiny(), hidden_size=12, num_hidden_layers=1, num_attention_heads=2)
        te = dataclasses.replace(te, intermediate_size=24, projection_dim=12)
        vq = wj.StageAConfig(bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=64)
        return dict(prior=UNetConfig.tiny_prior(), decoder=UNetConfig.tiny_decoder(), vqgan=vq, text=te)
    raise ValueError(f"unknown config {name!r}")


def build_modules(cfg: dict, dtype) -> dict:
    return {
        "text_encoder": CLIPTextModelWithProjection(cfg["text"], dtype, dtype),
        "prior": StableCascadeUNet(cfg["prior"], dtype, dtype),
        "decoder": StableCascadeUNet(cfg["decoder"], dtype, dtype),
        "vqgan": wj.PaellaVQModel(cfg["vqgan"], dtype, dtype),
    }


def make_pipeline(cfg: dict, mods: dict, var: dict, tokenizer) -> wj.StableCascadeCombinedPipeline:
    c = {k: Component(m, var[k]) for k, m in mods.items()}
    prior = wj.StableCascadePriorPipeline(tokenizer, c["text_encoder"], c["prior"], progress=False)
    decoder = wj.StableCascadeDecoderPipeline(
        c["decoder"], tokenizer, c["text_encoder"], None, c["vqgan"], progress=False
    )
    return wj.StableCascadeCombinedPipeline(prior, decoder)


PROMPT = "a photo of a cat"


def generate(pipe, batch: int, res: int, steps: tuple[int, int] = STEPS) -> np.ndarray:
    kw = dict(prior_num_inference_steps=steps[0], prior_guidance_scale=PRIOR_GUIDANCE, seed=0, height=res)
    kw.update(width=res, num_inference_steps=steps[1], decoder_guidance_scale=DECODER_GUIDANCE)
    return pipe(PROMPT, output_type="np", num_images_per_prompt=batch, **kw).images


def stages_once(pipe, batch: int, res: int, steps: tuple[int, int] = STEPS) -> tuple[dict, np.ndarray]:
    """The prior pipeline call, then the decoder pipeline call on its latents (each synchronised on its output)."""
    t0 = time.perf_counter()
    kw = dict(num_images_per_prompt=batch, seed=0, height=res, width=res)
    emb = pipe.prior_pipe(PROMPT, num_inference_steps=steps[0], guidance_scale=PRIOR_GUIDANCE, **kw)
    emb = jax.block_until_ready(emb.image_embeddings)
    t1 = time.perf_counter()
    img = pipe.decoder_pipe(emb, PROMPT, steps[1], guidance_scale=DECODER_GUIDANCE, seed=0, output_type="np")
    img = np.asarray(img.images)
    return dict(text=None, prior=t1 - t0, decoder=time.perf_counter() - t1, vqgan=None), img


def child(a, gb) -> dict:
    """As `generate_benchmark.child` for a Stable Cascade config (`gb`: that module, for its shared helpers)."""
    wj.enable_compilation_cache(a.cache_dir)
    t_imported, batch, cfg = time.time(), a.batch[0], configs(a.config)
    mods = build_modules(cfg, {"bf16": jnp.bfloat16, "f32": jnp.float32}[a.dtype])
    var = jax.block_until_ready({k: gb.init_variables(m, i) for i, (k, m) in enumerate(mods.items())})
    init_s = time.time() - t_imported
    steps = tuple(a.steps or STEPS)
    pipe = make_pipeline(cfg, mods, var, gb.FakeTokenizer(cfg["text"].vocab_size))
    if a.child == "warm":
        finite = bool(np.isfinite(generate(pipe, batch, a.res, steps)).all())
        return dict(ready_at=time.time(), imports_done_at=t_imported, init_s=init_s, finite=finite, **gb.memory())
    first = gb.timed(generate, pipe, batch, a.res, steps)  # compiles every stage
    runs = [stages_once(pipe, batch, a.res, steps) for _ in range(a.reps)]
    pipe_s = [gb.timed(generate, pipe, batch, a.res, steps) for _ in range(a.reps)]
    img, dev = runs[-1][1], jax.devices()[0]
    out = dict(device=dev.device_kind, platform=dev.platform, compile_s=first - statistics.median(pipe_s))
    stage_s = {s: None if runs[0][0][s] is None else statistics.median(r[0][s] for r in runs) for s in gb.STAGES}
    out.update(stage_s=stage_s, first_call_s=first, init_s=init_s, pipeline_s=statistics.median(pipe_s))
    out.update(pipeline_first_call_s=first, flops_per_image=None, text_encoder=TEXT_ENCODER[a.config])
    out.update(steps=dict(prior=steps[0], prior_guidance=PRIOR_GUIDANCE, decoder=steps[1]))
    out.update(finite=bool(np.isfinite(img).all()), image_shape=list(img.shape), **gb.memory())
    out.update(params={k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in var.items()})
    return out
