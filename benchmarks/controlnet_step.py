"""What a stage C ControlNet costs, relative to plain stage C: one sampling step, the ControlNet's own forward (run
once per image: the control is the same at every step) and one train step, at a small config on the CPU.

Usage (repo root):  python benchmarks/controlnet_step.py [--size 16] [--batch 2] [--repeats 5] [--no-write]
Stage C: a small stage-C-shaped network (`small_stage_c`: 2 levels at one resolution, 128 channels, 6 + 6 ResBlocks)
on [B, size, size, 16] latents. ControlNet: the released canny layout (EfficientNetV2-S backbone, 1-channel
Canny input at 32 · size pixels, 8 projections into ResBlocks 0, 2, 4, 5 / 6, 7, 9, 11 of the 12). Sampling step:
the jitted denoiser call with CFG's doubled batch, with and without a (precomputed) control. Train step:
`build_train_setup` on the ControlNet loss (stage C frozen) against a stage C fine-tune step (every parameter
trained, the same loss without control). Each timing is the median of `--repeats` calls after one warm-up call.
Then (unless `--no-flops`) XLA's FLOP counts at the released sizes (`released_flops`), which no CPU can time.
The table is appended to benchmarks/RESULTS.md and one JSON row to benchmarks/results.jsonl unless `--no-write`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.controlnet.training import TRAINABLE, controlnet_loss, controlnet_variables
from wurst_jax.models.cascade import ControlNetConfig, StableCascadeControlNet, StableCascadeUNet
from wurst_jax.models.cascade.config import StableCascadeUNetConfig
from wurst_jax.train.config import RunConfig
from wurst_jax.train.setup import build_train_setup

OUT = Path(__file__).parent


def small_stage_c() -> StableCascadeUNetConfig:
    return dataclasses.replace(
        StableCascadeUNetConfig.stage_c(),
        conditioning_dim=128,
        block_out_channels=(128, 128),
        num_attention_heads=(4, 4),
        down_num_layers_per_block=(2, 4),
        up_num_layers_per_block=(4, 2),
        clip_text_in_channels=64,
        clip_text_pooled_in_channels=64,
        clip_image_in_channels=32,
    )


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, help="stage C latent side (the condition image is 32× that)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the released sizes' FLOP counts")
    args = p.parse_args()
    b, s = args.batch, args.size
    cfg = small_stage_c()
    unet = StableCascadeUNet(cfg)
    cn = StableCascadeControlNet(ControlNetConfig(c_in=1, c_proj=128, proj_blocks=(0, 2, 4, 5, 6, 7, 9, 11)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, s, 16), np.float32)
    r = np.full((b,), 0.5, np.float32)
    pooled, text = rng.standard_normal((b, 1, 64), np.float32), rng.standard_normal((b, 8, 64), np.float32)
    img = np.zeros((b, 1, 32), np.float32)
    cond = (rng.random((b, 32 * s, 32 * s, 1)) > 0.9).astype(np.float32)
    unet_vars = jax.jit(unet.init)(jax.random.key(0), x, r, pooled, text, img)
    cn_vars = jax.jit(cn.init)(jax.random.key(1), cond[:1])
    cn_vars = jax.tree_util.tree_map(lambda v: v + 0.01, cn_vars)  # non-zero projections

    step = jax.jit(lambda v, c: unet.apply(v, x, r, pooled, text, img, control=c))
    cn_apply = jax.jit(cn.apply)
    control = cn_apply(cn_vars, cond)
    rows = {
        "stage C step": timed(lambda: step(unet_vars, None), args.repeats),
        "stage C step + control": timed(lambda: step(unet_vars, control), args.repeats),
        "ControlNet forward (once per image)": timed(lambda: cn_apply(cn_vars, cond[:1]), args.repeats),
    }

    batch = {"latents": x, "condition": cond, "clip_text": text, "clip_text_pooled": pooled, "clip_img": img}
    run = RunConfig(lr=1e-4, warmup_steps=1)
    cn_loss = controlnet_loss(unet, cn)
    cn_setup = build_train_setup(cn_loss, controlnet_variables(unet_vars["params"], cn_vars), run, trainable=TRAINABLE)

    plain = {"latents": x, "clip_text": text, "clip_text_pooled": pooled, "clip_img": img}
    plain_setup = build_train_setup(_without_control(unet), {"params": unet_vars["params"]}, run)
    state = {"cn": cn_setup.state, "plain": plain_setup.state}

    def cn_step():
        state["cn"], m = cn_setup.step(state["cn"], batch)
        return m["loss"]

    def plain_step():
        state["plain"], m = plain_setup.step(state["plain"], plain)
        return m["loss"]

    rows["stage C train step (all of stage C trained)"] = timed(plain_step, args.repeats)
    rows["ControlNet train step (stage C frozen)"] = timed(cn_step, args.repeats)
    report(args, rows, released_flops() if args.flops else {})


def released_flops() -> dict[str, float]:
    """XLA's FLOP counts (lowered programs, nothing compiled or allocated) at the released sizes: the 3.6B stage
    C at 1024² (latent 24², CFG batch 2, 77 text tokens) and the canny ControlNet on a 768² condition (batch 1),
    forward and train step (gradients of the trained parameters only)."""
    from wurst_jax.models.cascade import abstract_params

    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    cfg = StableCascadeUNetConfig.stage_c()
    unet, cn = StableCascadeUNet(cfg), StableCascadeControlNet(ControlNetConfig.canny())
    p = abstract_params(cfg)
    cn_v = jax.eval_shape(lambda: cn.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1))))

    def inputs(b):
        return (S((b, 24, 24, 16), f32), S((b,), f32), S((b, 1, 1280), f32), S((b, 77, 1280), f32),
                S((b, 1, 768), f32))  # fmt: skip

    def flops(fn, *a) -> float:
        return float(jax.jit(fn).lower(*a).cost_analysis()["flops"])

    control = jax.eval_shape(cn.apply, cn_v, S((2, 768, 768, 1), f32))
    unet_loss = lambda p, c, *a: jnp.mean(jnp.square(unet.apply({"params": p}, *a, control=c)))  # noqa: E731

    def cn_loss(cp, stats, p, cond, *a):
        return unet_loss(p, cn.apply({"params": cp, "batch_stats": stats}, cond), *a)

    return {
        "stage C step (CFG batch 2)": flops(lambda p, *a: unet.apply({"params": p}, *a), p, *inputs(2)),
        "stage C step + control": flops(
            lambda p, c, *a: unet.apply({"params": p}, *a, control=c), p, control, *inputs(2)
        ),  # fmt: skip
        "ControlNet forward, 768² (once per image)": flops(cn.apply, cn_v, S((1, 768, 768, 1), f32)),
        "stage C train step, batch 1 (all of stage C)": flops(jax.grad(unet_loss), p, None, *inputs(1)),
        "ControlNet train step, batch 1 (stage C frozen)": flops(
            jax.grad(cn_loss), cn_v["params"], cn_v["batch_stats"], p, S((1, 768, 768, 1), f32), *inputs(1)
        ),
    }


def _without_control(unet):
    """The ControlNet objective with no ControlNet: stage C alone, every parameter trained."""
    from wurst_jax.controlnet.training import noise_condition
    from wurst_jax.samplers import ddpm_wuerstchen as sched
    from wurst_jax.train.objectives import sample_t

    def loss(params, stats, key, batch):
        r_t, r_n, r_d = jax.random.split(key, 3)
        x0 = batch["latents"]
        ac = sched.alpha_cumprod(sample_t(r_t, x0.shape[0], "b"), sched.DDPMWuerstchen())
        noise = jax.random.normal(r_n, x0.shape)
        a = ac[:, None, None, None]
        noised = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        conds = (batch["clip_text_pooled"], batch["clip_text"], batch["clip_img"])
        pred = unet.apply(
            {"params": params}, noised, noise_condition(ac), *conds, deterministic=False, rngs={"dropout": r_d}
        )
        return jnp.mean(jnp.mean(jnp.square(pred - noise), axis=(1, 2, 3)) * (1 - ac)), {}

    return loss


def report(args, rows: dict[str, float], flops: dict[str, float]) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    device = f"{jax.devices()[0].platform} ({platform.machine()}, {jax.device_count()} devices)"
    lines = [
        f"## ControlNet cost · {stamp} · {device} · small stage C (128 ch, 12 ResBlocks), latent {args.size}², "
        f"canny ControlNet (EfficientNetV2-S) on {32 * args.size}², batch {args.batch}, float32",
        "",
        "| what | median s | relative |",
        "|---|---|---|",
    ]
    lines += _table(rows, "{:.4f}")
    if flops:
        lines += ["", "Released sizes (3.6B stage C, canny ControlNet), XLA FLOP counts of the lowered programs:", "",
                  "| what | TFLOP | relative |", "|---|---|---|"]  # fmt: skip
        lines += _table({k: v / 1e12 for k, v in flops.items()}, "{:.3f}")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with open(OUT / "RESULTS.md", "a") as f:
            f.write("\n" + text + "\n")
        row = {"implementation": "wurst_jax", "benchmark": "controlnet", "device": device, "date": stamp,
               "latent": args.size, "batch": args.batch, "seconds": rows, "released_flops": flops}  # fmt: skip
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _table(rows: dict[str, float], fmt: str) -> list[str]:
    """Rows relative to the first train / non-train row (the plain stage C figure)."""
    base = {}
    for name, v in rows.items():
        base.setdefault("train" in name, v)
    return [f"| {name} | {fmt.format(v)} | {v / base['train' in name]:.3f}× |" for name, v in rows.items()]


if __name__ == "__main__":
    main()
