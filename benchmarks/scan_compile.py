"""Compile time of the inference loops, repeated blocks unrolled vs one `lax.scan` (`scan_blocks`), nothing run.

Usage (repo root):  python benchmarks/scan_compile.py --stage prior decoder vqgan --res 1024 [--prior-depth 8]
                    python benchmarks/scan_compile.py --stage stage_c stage_b --res 1024   (Stable Cascade)
                    python benchmarks/scan_compile.py --stage prior --res 256 --prior-depth 8 --run 5   (run time)
Each (stage, mode) is lowered and compiled in a fresh child process (no persistent compilation cache, nothing
shared) from abstract inputs (`jax.ShapeDtypeStruct`: no weights are made): the pipelines' own stage functions,
`run_loop` for the prior (29 steps, CFG as one batch) and the decoder (12 steps), `decode_images` for the VQGAN;
Stable Cascade's `run_loop` for stage C (20 steps, CFG) and stage B (10 steps), as `wurst-jax generate` runs them.
Full-size configs (v2; Stable Cascade's released stage_c / stage_b) in bf16 unless `--prior-depth` /
`--decoder-blocks` reduce the v2 depth (to fit a slow host).
`--run N` also runs the compiled loop N times on random weights and inputs made for it (after one untimed call)
and reports the median seconds per call (`run_s`): scanned against unrolled run time, at a size the host can run.
Prints one JSON line per measurement and appends them to `--out` (default benchmarks/results.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "SCAN_ROW "
STAGES = ("prior", "decoder", "vqgan", "stage_c", "stage_b")


def measure(
    stage: str, scan: bool, res: int, batch: int, prior_depth: int, decoder_blocks: tuple | None, runs: int = 0
) -> dict:
    """In this process: lower + compile one stage function at full size (abstract inputs), timed apart."""
    os.environ.setdefault("WURST_JAX_CACHE_DIR", "off")
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    import wurst_jax as wj
    from wurst_jax.models import abstract_variables
    from wurst_jax.pipelines.runner import run_loop
    from wurst_jax.pipelines.wuerstchen import decode_images, decoder_model, prior_model
    from wurst_jax.samplers import DEFAULT_STAGE_C_TIMESTEPS, DDPMWuerstchen

    dt, f32 = jnp.bfloat16, jnp.float32
    sds = jax.ShapeDtypeStruct
    h = int(-(-res // 42.67))  # ceil(res / 42.67), as the pipeline
    hb = int(h * 10.67)
    config: dict = {}
    if stage == "prior":
        cfg = dataclasses.replace(wj.StageCConfig.v2(), depth=prior_depth)
        module = wj.WuerstchenPrior(cfg, dtype=dt, param_dtype=dt, scan_blocks=scan)
        steps, shape = len(DEFAULT_STAGE_C_TIMESTEPS), (h, h, cfg.c_in)
        cond = {"clip": sds((batch, 77, cfg.c_cond), jnp.float32)}
        uncond, model_fn, config = cond, prior_model, {"depth": cfg.depth}
    elif stage == "decoder":
        cfg = wj.StageBConfig.v2()
        if decoder_blocks:
            cfg = dataclasses.replace(cfg, blocks=decoder_blocks)
        module = wj.WuerstchenDiffNeXt(cfg, dtype=dt, param_dtype=dt, scan_blocks=scan)
        steps, shape = 12, (hb, hb, cfg.c_in)
        cond = {"effnet": sds((batch, h, h, cfg.effnet_embd), jnp.float32)}
        cond["clip"] = sds((batch, 77, cfg.clip_embd), jnp.float32)
        uncond, model_fn, config = None, decoder_model, {"blocks": list(cfg.blocks)}
    elif stage == "stage_c":
        from wurst_jax.models.cascade import StableCascadeUNet, StableCascadeUNetConfig
        from wurst_jax.pipelines.cascade_prior import cascade_prior_model

        cfg = StableCascadeUNetConfig.stage_c()
        module = StableCascadeUNet(cfg, dtype=dt, param_dtype=dt, scan_blocks=scan)
        steps, shape = 20, (h, h, cfg.in_channels)
        cond = {"text": sds((batch, 77, cfg.clip_text_in_channels), f32)}
        cond["pooled"] = sds((batch, 1, cfg.clip_text_pooled_in_channels), f32)
        cond["image"] = sds((batch, 1, cfg.clip_image_in_channels), f32)
        uncond, model_fn, config = cond, cascade_prior_model, {"preset": "stage_c"}
    elif stage == "stage_b":
        from wurst_jax.models.cascade import StableCascadeUNet, StableCascadeUNetConfig
        from wurst_jax.pipelines.cascade import cascade_decoder_model

        cfg = StableCascadeUNetConfig.stage_b()
        module = StableCascadeUNet(cfg, dtype=dt, param_dtype=dt, scan_blocks=scan)
        steps, shape = 10, (hb, hb, cfg.in_channels)
        cond = {"effnet": sds((batch, h, h, cfg.effnet_in_channels), f32)}
        cond["pooled"] = sds((batch, 1, cfg.clip_text_pooled_in_channels), f32)
        uncond, model_fn, config = None, cascade_decoder_model, {"preset": "stage_b"}
    else:
        module = wj.PaellaVQModel(wj.StageAConfig.v2(), dtype=dt, param_dtype=dt)
    variables = abstract_variables(module)
    t0 = time.perf_counter()
    if stage == "vqgan":
        jitted = jax.jit(decode_images, static_argnames=("module",))
        args = (sds((batch, hb, hb, 4), jnp.float32),)
        lowered = jitted.lower(variables, *args, module=module)
    else:
        static = dict(module=module, model_fn=model_fn, sampler=DDPMWuerstchen())
        jitted = jax.jit(run_loop, static_argnames=tuple(static))
        args = (sds((batch, *shape), f32), sds((steps + 1,), f32), sds((steps, batch, *shape), f32), cond, uncond)
        args = (*args, sds((), f32), None)
        lowered = jitted.lower(variables, *args, **static)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    run = {} if not runs else dict(run_s=time_runs(compiled, variables, args, runs), runs=runs)
    return dict(
        benchmark="scan_compile",
        stage=stage,
        mode="scan" if scan else "unrolled",
        lower_s=round(t1 - t0, 2),
        compile_s=round(t2 - t1, 2),
        total_s=round(t2 - t0, 2),
        resolution=res,
        batch=batch,
        dtype="bfloat16",
        config=config,
        **run,
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def time_runs(compiled, variables, args: tuple, runs: int) -> float:
    """Median seconds of `runs` calls of `compiled` on random weights and inputs (normal × 0.02) of the lowered
    shapes, after one untimed call. A loop's timesteps run from 1 to 0 as a sampler's do, guidance scale 4."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    make = lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02, s.dtype)  # noqa: E731
    concrete = [jax.tree.map(make, a) for a in args]  # None (no unconditional batch / adapters) stays None
    if len(concrete) > 1:  # run_loop: (x, timesteps, noise, cond, uncond, guidance scale, adapters)
        concrete[1] = jnp.linspace(1.0, 0.0, args[1].shape[0], dtype=args[1].dtype)
        concrete[-2] = jnp.asarray(4.0, args[-2].dtype)
    weights = jax.tree.map(make, variables)
    jax.block_until_ready(compiled(weights, *concrete))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(compiled(weights, *concrete))
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)), 4)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", default=["prior", "decoder", "vqgan"], choices=STAGES)
    p.add_argument("--mode", nargs="+", default=["unrolled", "scan"], choices=("unrolled", "scan"))
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prior-depth", type=int, default=32, help="triples in the prior (v2: 32)")
    p.add_argument("--decoder-blocks", type=int, nargs=4, help="repeats per decoder level (v2: 4 4 14 4)")
    p.add_argument("--run", type=int, default=0, metavar="N", help="also time N runs of each compiled loop")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.jsonl"))
    p.add_argument("--child", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    blocks = tuple(a.decoder_blocks) if a.decoder_blocks else None
    if a.child:
        row = measure(a.child[0], a.child[1] == "scan", a.res, a.batch, a.prior_depth, blocks, a.run)
        print(MARK + json.dumps(row), flush=True)
        return
    for stage in a.stage:
        for mode in ("unrolled",) if stage == "vqgan" else a.mode:  # the VQGAN has no repeated-block option
            cmd = [sys.executable, __file__, "--child", stage, mode, "--res", str(a.res), "--batch", str(a.batch)]
            cmd += ["--run", str(a.run)]
            cmd += ["--prior-depth", str(a.prior_depth)] + (["--decoder-blocks", *map(str, blocks)] if blocks else [])
            env = dict(os.environ, WURST_JAX_CACHE_DIR="off")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            rows = [json.loads(line[len(MARK) :]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
            if not rows:
                print(f"{stage} {mode}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            print(json.dumps(rows[0]), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rows[0]) + "\n")


if __name__ == "__main__":
    main()
