"""Where a tiny model loses shapes: Stage A alone, and Stage B redrawing held-out scenes from their true semantic
latents (no prior involved). Needs a training run folder (`out` of a tiny config: `variables`, `ckpt_b`), since the
semantic encoder is not part of the exported pipeline.

Usage: python benchmarks/tiny_stage_b_check.py --config wurst_jax/train/configs/tiny.json
(the run's config: its `out` folder and its "model" section, as `wurst-jax train` reads them).
Scores (wurst_jax.tiny.checker) over `--n` single-object held-out scenes; Stage B 12 steps at decoder guidance
0 / 2 / 4 with the same noise; Stage B weights: the EMA of the newest `ckpt_b` checkpoint.
"""

import argparse
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from wurst_jax.pipelines.prompts import caption_tokens
from wurst_jax.pipelines.runner import run_loop
from wurst_jax.pipelines.wuerstchen import decode_images, decoder_model
from wurst_jax.samplers import ddpm_wuerstchen as sched
from wurst_jax.tiny.checker import score
from wurst_jax.tiny.data import render, sample_scenes
from wurst_jax.tiny.recipe import absorb, init_variables, modules, tiny_config, trainable
from wurst_jax.train.cli import ASSETS
from wurst_jax.train.config import read_config, tiny_run_config
from wurst_jax.train.state import Checkpoints, create_state, make_optimizer
from wurst_jax.weights.orbax_io import restore_variables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="the tiny run's JSON config (its 'out' holds variables, ckpt_b)")
    ap.add_argument("--n", type=int, default=64)
    a = ap.parse_args()
    tiny = tiny_run_config(read_config(a.config), None, a.config)
    cfg = tiny_config(tiny.model, tiny.size, a.config)
    mods, run = modules(cfg), Path(tiny.out)
    v = restore_variables(run / "variables", jax.eval_shape(lambda: init_variables(cfg, mods)))
    params, _ = trainable("b", v)
    like = jax.eval_shape(lambda: create_state(params, make_optimizer(1e-3), 0, {}))
    state = Checkpoints(run / "ckpt_b").restore(like)
    v = absorb("b", v, state.ema, None)

    scenes = [s for s in sample_scenes(7, 400, "heldout") if s.count == 1][: a.n]  # 400 draws: ≈ 240 single
    images = np.stack([render(s, cfg.size) for s in scenes]).astype(np.float32) / 255
    vq = mods["vqgan"]
    rec = np.clip(
        np.asarray(vq.apply(v["vqgan"], vq.apply(v["vqgan"], images, method="encode"), method="decode")), 0, 1
    )
    print(f"Stage A encode → decode: {score(rec, scenes)}")

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    clip = mods["text"].apply(v["text_decoder"], *caption_tokens(tok, [s.captions()[0] for s in scenes]))
    empty_clip = mods["text"].apply(v["text_decoder"], *caption_tokens(tok, [""]))
    semantic = mods["semantic"].apply(v["semantic"], images)
    n, side = len(scenes), cfg.size // 4
    k1, k2 = jax.random.split(jax.random.key(0))
    latents, noise = jax.random.normal(k1, (n, side, side, 4)), jax.random.normal(k2, (12, n, side, side, 4))
    for g in (0.0, 2.0, 4.0):
        cfg_on = g > 1
        cond = {"effnet": semantic, "clip": clip}
        uncond = {"effnet": jnp.zeros_like(semantic), "clip": jnp.broadcast_to(empty_clip, clip.shape)}
        static = dict(module=mods["decoder"], model_fn=decoder_model, sampler=sched.DDPMWuerstchen())
        loop = jax.jit(partial(run_loop, **static))
        ts = jnp.asarray(sched.timesteps(12))
        z = loop(v["decoder"], latents, ts, noise, cond, uncond if cfg_on else None, jnp.float32(g), None)
        out = np.asarray(decode_images(v["vqgan"], z, module=vq))
        print(
            f"Stage B from true semantic latents, decoder guidance {g:g} (step {int(state.step)}): {score(out, scenes)}"
        )


if __name__ == "__main__":
    main()
