"""Train-step benchmark: Stage C (the ~1B-parameter Würstchen v2 prior) at 1024², random weights; `--stage b`:
the same for Stage B (the ~1B-parameter decoder: Stage A latents [B, res/4, res/4, 4], the semantic latents and
CLIP ViT-H text states as conditions, `objectives.stage_b_loss` with 10 % conditioning dropout).

Usage (repo root):  python benchmarks/train_benchmark.py --config v2 --batch 8 [--sharding fsdp] [--steps 10]
One train step is the fine-tune's own: `objectives.component_loss` (Stage C: P2-weighted ε-MSE with 10 % text
dropout to the empty prompt's states, zeros here; model dropout on) through `build_train_setup` (AdamW with
warm-up and global-norm clipping from `make_optimizer`, EMA of the params), jitted with the state donated.
Params are f32 masters, the math bf16 (`dtype=bfloat16`, `param_dtype=float32`). Inputs are Stage C latents
[B, h, h, 16] (h = ceil(res / 42.67): 24 at 1024²) and CLIP text states [B, 77, c_cond], random, placed once: the
figures are the step's, not a data pipeline's.
With more than one device the state is sharded over a ("data", "model") mesh as `--sharding` says (dp: params
replicated; fsdp: every param, its Adam moments and its EMA split) and the batch over "data"; the state is made
by jits with `out_shardings` (never the full tree on one device first; `--init`, see `make_state`). On one
device: no mesh.
Timing: explicit lower + compile (`compile_s`), `--warmup` steps, then `--steps` steps dispatched back to back and
timed to `block_until_ready` of the last state. FLOPs are model FLOPs: XLA's `cost_analysis()` of the lowered,
unpartitioned step of the plain model (blocks unrolled, no remat; forward + backward + optimizer + EMA), whatever
`--scan-blocks` / `--remat` run, so a rematerialised forward is not counted as useful work and a scanned body is
not counted once; per device = that / devices. MFU = per-device model FLOPs per step / step time / the device's
dense bf16 peak (`generate_benchmark.device_peak`, or `--peak-tflops`). `xla_flops_per_device_step` is the compiled
program's own count (remat recompute included; None with `--scan-blocks`, whose loop body XLA counts once).
`--scan-blocks` and `--remat` are the models' options of those names. Peak memory: the
device allocator's peak (largest over local devices; n/a on the CPU). The table is appended to
`<out-dir>/RESULTS.md` and one JSON row to `<out-dir>/results.jsonl` unless `--no-write`, each batch size as soon as
it is measured; one that runs out of device memory is written as such (`"out_of_memory": true`) and ends the run
(give the sizes smallest first).
`--compile-only` compiles the step against the abstract state and records the compile time, model FLOPs and XLA's
buffer sizes (`memory_analysis`: temp and argument bytes) without allocating or timing anything: how much memory
a batch size, `--scan-blocks` and `--remat` need, as that backend's compiler plans it.
`--dry-run` only traces abstractly (`jax.eval_shape`): parameter count and train-state bytes, per device with the
sharding; nothing is compiled, nothing allocated — the way to check the full-size config on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_benchmark as gb  # noqa: E402  (also puts the repo root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

import wurst_jax as wj  # noqa: E402
from wurst_jax.models import example_inputs  # noqa: E402
from wurst_jax.sharding import DATA  # noqa: E402
from wurst_jax.train import objectives  # noqa: E402
from wurst_jax.train.config import RunConfig  # noqa: E402
from wurst_jax.train.setup import build_train_setup  # noqa: E402
from wurst_jax.train.state import batch_sharding  # noqa: E402

BENCHMARK = "train_step_stage_{}"
TEXT_LEN = 77
LR, WARMUP_SCHEDULE, EMA_DECAY, SEED, COND_DROPOUT = 1e-4, 100, 0.999, 0, 0.1
RUN = RunConfig(lr=LR, warmup_steps=WARMUP_SCHEDULE, ema_decay=EMA_DECAY, seed=SEED, cond_dropout=COND_DROPOUT)
DEFAULTS = {"v2": dict(res=1024, batch=8), "small": dict(res=256, batch=8)}  # small: divides 8 fake CPU devices
KEYS = ("implementation", "benchmark", "device", "date", "config", "batch", "samples_per_s", "seconds_per_step")
KEYS += ("mfu", "flops_per_step", "compile_s", "peak_mem_bytes", "params")


def stage_c_config(name: str) -> wj.StageCConfig:
    """v2: the released prior (993,636,896 params); small: two blocks of width 64, compiles in seconds on a CPU."""
    if name == "v2":
        return wj.StageCConfig.v2()
    if name == "small":
        return wj.StageCConfig(c_in=16, c=64, c_cond=64, c_r=16, depth=2, nhead=4, dropout=0.1)
    raise ValueError(f"unknown config {name!r}")


def stage_b_config(name: str) -> wj.StageBConfig:
    """v2: the released decoder (1,055,365,280 params); small: two levels, two repeats at the second."""
    if name == "v2":
        return wj.StageBConfig.v2()
    if name == "small":
        kw = dict(c_hidden=(16, 32), nhead=(-1, 2), blocks=(1, 2), level_config=("CT", "CTA"))
        return wj.StageBConfig(c_r=16, c_cond=32, clip_embd=32, inject_effnet=(False, True), **kw)
    raise ValueError(f"unknown config {name!r}")


def latent_side(res: int) -> int:
    return math.ceil(res / 42.67)  # the prior pipeline's latent grid: 24 at 1024²


def build(a) -> dict:
    """Module, train setup (optimizer, step, abstract state and its shardings), mesh and batch shapes: nothing
    allocated yet (`make_state` makes the state)."""
    options = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, scan_blocks=a.scan_blocks, remat=a.remat)
    if a.stage == "b":
        cfg = stage_b_config(a.config)
        module = wj.WuerstchenDiffNeXt(cfg, **options)
        text_width = cfg.clip_embd
    else:
        cfg = stage_c_config(a.config)
        module = wj.WuerstchenPrior(cfg, **options)
        text_width = cfg.c_cond
    # the fine-tune's loss: conditioning (Stage B) or text (Stage C) dropped to the empty prompt's states
    empty_clip = jnp.zeros((1, TEXT_LEN, text_width), jnp.float32)
    loss_fn = objectives.component_loss(a.stage, module, empty_clip, COND_DROPOUT)

    def init_variables():
        inputs = [jnp.zeros(x.shape, x.dtype) for x in example_inputs(module)]
        return {"params": nn.meta.unbox(module.init(jax.random.key(SEED), *inputs)["params"])}

    devices = jax.devices()[: a.devices] if a.devices else jax.devices()
    h, f32 = latent_side(a.res), jnp.float32
    if a.stage == "b":  # Stage A latents (4× down), the semantic latents, CLIP ViT-H text states
        batch_shapes = {
            "latents": jax.ShapeDtypeStruct((a.batch, a.res // 4, a.res // 4, cfg.c_in), f32),
            "effnet": jax.ShapeDtypeStruct((a.batch, h, h, cfg.effnet_embd), f32),
            "clip": jax.ShapeDtypeStruct((a.batch, TEXT_LEN, cfg.clip_embd), f32),
        }
    else:
        batch_shapes = {
            "latents": jax.ShapeDtypeStruct((a.batch, h, h, cfg.c_in), f32),
            "clip": jax.ShapeDtypeStruct((a.batch, TEXT_LEN, cfg.c_cond), f32),
        }
    mesh, batch_sh, sharding = None, None, None
    if len(devices) > 1:
        mesh = wj.make_mesh(data=-1, model=1, devices=devices)
        if a.batch % mesh.shape[DATA]:
            raise SystemExit(f"--batch {a.batch} does not divide over the {mesh.shape[DATA]}-way data axis")
        batch_sh = jax.tree_util.tree_map(batch_sharding(mesh), batch_shapes)
        sharding = a.sharding
    setup = build_train_setup(
        loss_fn, init_variables, RUN, module=module, mesh=mesh, mode=a.sharding, batch_shardings=batch_sh,
        allocate=False,
    )  # fmt: skip
    out = dict(cfg=cfg, module=module, setup=setup, init_variables=init_variables, devices=devices)
    out.update(abstract=setup.abstract, state_sh=setup.shardings, batch_shapes=batch_shapes, batch_sh=batch_sh)
    out.update(mesh=mesh, sharding=sharding)
    return out


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def per_device_bytes(abstract, shardings) -> int:
    """Bytes of the state on one device: each leaf's shard shape (the whole leaf when unsharded)."""
    if shardings is None:
        return tree_bytes(abstract)
    sizes = jax.tree_util.tree_map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize, abstract, shardings
    )
    return sum(jax.tree_util.tree_leaves(sizes))


def dry_run(a) -> dict:
    """Shapes only: parameter count and train-state bytes (params, Adam moments, EMA), total and per device."""
    b = build(a)
    params = sum(x.size for x in jax.tree_util.tree_leaves(b["abstract"].params))
    return dict(
        config=a.config, params=params, state_bytes=tree_bytes(b["abstract"]), n_devices=len(b["devices"]),
        state_bytes_per_device=per_device_bytes(b["abstract"], b["state_sh"]), sharding=b["sharding"],
        latent_shape=list(b["batch_shapes"]["latents"].shape), text_shape=list(b["batch_shapes"]["clip"].shape),
    )  # fmt: skip


def xla_flops(stage) -> float | None:
    """FLOPs from XLA's cost analysis of a `Lowered` (global) or `Compiled` (per device) program."""
    try:
        ca = stage.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    total = sum(float(c.get("flops", 0.0)) for c in (ca if isinstance(ca, (list, tuple)) else [ca]) if c)
    return total or None


def model_flops(a, lowered) -> float | None:
    """Global FLOPs of one step of the plain model (unrolled, no remat) at this batch: `lowered` (the step being
    measured) when that is the plain model, else the plain step lowered for the count, never compiled."""
    if a.scan_blocks or a.remat:
        p = build(argparse.Namespace(**{**vars(a), "scan_blocks": False, "remat": False}))
        lowered = jax.jit(p["setup"].train_step).lower(p["abstract"], p["batch_shapes"])
    return xla_flops(lowered)


def peak_memory(devices) -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices if d.process_index == 0]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def make_batch(shapes: dict, shardings: dict | None, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    host = {k: rng.standard_normal(s.shape, np.float32) for k, s in shapes.items()}
    if shardings is None:
        return jax.device_put(host, jax.devices()[0])
    return {k: jax.make_array_from_callback(x.shape, shardings[k], lambda i, x=x: x[i]) for k, x in host.items()}


def make_state(b: dict, init: str):
    """The train state on the devices (sharded on a mesh), made where it lives (`TrainSetup.make_state`).
    flax: `module.init` in one jit — its random draws expand into one RNG program per parameter (648 for v2).
    normal: every parameter N(0, 0.02²), drawn by one jitted function per distinct (shape, sharding) — 13 for
    v2 — then the Adam moments and the EMA from them; random weights all the same, far less to compile."""
    setup = b["setup"]
    if init == "flax":
        return setup.make_state(b["init_variables"])
    out_sh = setup.shardings or jax.sharding.SingleDeviceSharding(b["devices"][0])
    leaves, treedef = jax.tree_util.tree_flatten(b["abstract"].params)
    shardings = treedef.flatten_up_to(out_sh.params) if setup.shardings else [out_sh] * len(leaves)
    draws = {}

    def draw(x, sharding, key):
        spec = (x.shape, x.dtype, sharding)
        if spec not in draws:
            normal = lambda k, shape=x.shape, dtype=x.dtype: 0.02 * jax.random.normal(k, shape, dtype)  # noqa: E731
            draws[spec] = jax.jit(normal, out_shardings=sharding)
        return draws[spec](key)

    keys = jax.random.split(jax.random.key(SEED), len(leaves))
    params = treedef.unflatten([draw(x, sh, k) for x, sh, k in zip(leaves, shardings, keys, strict=True)])
    return setup.make_state({"params": params}, donate=True)


def progress(message: str) -> None:
    print(f"[train_benchmark] {message}", file=sys.stderr, flush=True)  # a run cut short still shows where it was


def benchmark(a, state=None) -> tuple[dict, object]:
    """Build, compile, warm up and time the train step at batch `a.batch`; returns the record (without date and
    versions) and the state, which the next batch size reuses (its init is compiled and run once per process).
    With `a.compile_only`: the step is compiled against the abstract state, nothing is allocated or run."""
    b = build(a)
    dev = b["devices"][0]
    init_s = None
    if state is None and not a.compile_only:
        t0 = time.perf_counter()
        state = jax.block_until_ready(make_state(b, a.init))
        init_s = time.perf_counter() - t0
        progress(f"state made on the device in {init_s:.1f} s ({a.init} init)")
    batch = b["batch_shapes"] if a.compile_only else make_batch(b["batch_shapes"], b["batch_sh"])
    step = b["setup"].step
    t0 = time.perf_counter()
    lowered = step.lower(b["abstract"] if a.compile_only else state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    progress(f"batch {a.batch}: train step compiled in {compile_s:.1f} s")
    n = len(b["devices"])
    total_flops = model_flops(a, lowered)
    if total_flops is None and not (a.scan_blocks or a.remat):  # no cost analysis of a Lowered on this jax
        total_flops = (xla_flops(compiled) or 0) * n or None
    per_device = total_flops and total_flops / n
    mem = compiled.memory_analysis()
    rec = dict(implementation="wurst_jax", benchmark=BENCHMARK.format(a.stage), stage=a.stage)
    rec.update(device=dev.device_kind, platform=dev.platform, n_devices=n, sharding=b["sharding"], config=a.config)
    rec[f"stage_{a.stage}"] = dataclasses.asdict(b["cfg"])
    rec.update(batch=a.batch, resolution=a.res, latent_shape=list(b["batch_shapes"]["latents"].shape))
    rec.update(text_shape=list(b["batch_shapes"]["clip"].shape), dtype="bf16 compute, f32 params")
    rec.update(compile_only=a.compile_only, compile_s=compile_s, state_init_s=init_s, init=a.init)
    rec.update(flops_per_device_step=per_device, flops_per_step=total_flops)
    rec.update(flops_per_sample=total_flops and total_flops / a.batch, scan_blocks=a.scan_blocks, remat=a.remat)
    rec["xla_flops_per_device_step"] = None if a.scan_blocks else xla_flops(compiled)
    rec.update(xla_temp_bytes=getattr(mem, "temp_size_in_bytes", None))
    rec.update(xla_argument_bytes=getattr(mem, "argument_size_in_bytes", None))
    rec.update(params=sum(x.size for x in jax.tree_util.tree_leaves(b["abstract"].params)))
    rec.update(
        state_bytes=tree_bytes(b["abstract"]), state_bytes_per_device=per_device_bytes(b["abstract"], b["state_sh"])
    )
    rec.update(optimizer=dict(lr=LR, warmup=WARMUP_SCHEDULE, ema_decay=EMA_DECAY, clip_norm=1.0, weight_decay=0.01))
    rec.update(dict.fromkeys(("steps", "warmup", "samples_per_s", "seconds_per_step", "mfu", "peak_mem_bytes")))
    rec.update(dict.fromkeys(("mfu_vs_measured_peak", "final_step", "final_loss", "loss_finite")))
    if a.compile_only:
        return rec, state
    for _ in range(a.warmup):
        state, metrics = step.run(compiled, state, batch)
    jax.block_until_ready(state)
    progress(f"batch {a.batch}: {a.warmup} warm-up steps done")
    t0 = time.perf_counter()
    for _ in range(a.steps):
        state, metrics = step.run(compiled, state, batch)
    jax.block_until_ready((state, metrics))
    seconds_per_step = (time.perf_counter() - t0) / a.steps
    rec.update(steps=a.steps, warmup=a.warmup, samples_per_s=a.batch / seconds_per_step)
    rec.update(seconds_per_step=seconds_per_step, peak_mem_bytes=peak_memory(b["devices"]))
    for key, table in (("mfu", gb.SPEC_PEAK), ("mfu_vs_measured_peak", gb.MEASURED_PEAK)):
        peak = gb.device_peak(dev.device_kind, table, a.peak_tflops)
        rec[key] = per_device / seconds_per_step / peak if per_device and peak else None
        rec["peak_flops" if key == "mfu" else "measured_peak_flops"] = peak
    rec.update(final_step=int(state.step), final_loss=float(metrics["loss"]))
    rec.update(loss_finite=bool(np.isfinite(rec["final_loss"])))
    return rec, state


def is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def blocks_label(rec: dict) -> str:
    return "+".join(name for name, on in (("scan", rec["scan_blocks"]), ("remat", rec["remat"])) if on) or "unrolled"


def out_of_memory_record(a, batch: int, err: Exception) -> dict:
    """The row of a batch size that did not fit: compiling or running it ran out of device memory."""
    dev = jax.devices()[0]
    rec = dict(implementation="wurst_jax", benchmark=BENCHMARK.format(a.stage), stage=a.stage)
    rec.update(
        device=dev.device_kind,
        platform=dev.platform,
        config=a.config,
        batch=batch,
        resolution=a.res,
        scan_blocks=a.scan_blocks,
        remat=a.remat,
    )
    rec.update(sharding=a.sharding if len(jax.devices()) > 1 else None, out_of_memory=True)
    rec["error"] = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
    return rec


def oom_markdown(rec: dict, argv: list[str]) -> str:
    head = f"## Train step, Stage {rec['stage'].upper()} · {rec['date']} · {rec['device']} · config `{rec['config']}`"
    return "\n".join([
        head, "", f"Command: `python benchmarks/train_benchmark.py {shlex.join(argv)}`", "",
        f"- batch {rec['batch']} ({blocks_label(rec)}): **out of device memory**: `{rec['error']}`", "",
    ])  # fmt: skip


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _bytes(x) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def markdown(rec: dict, argv: list[str]) -> str:
    head = f"## Train step, Stage {rec['stage'].upper()} · {rec['date']} · {rec['device']} × {rec['n_devices']}"
    head += f" · config `{rec['config']}`"
    vers = " · ".join(f"{k} {v}" for k, v in rec["versions"].items()) + f" · {os.cpu_count()} host CPUs"
    mfu = "–" if rec["mfu"] is None else f"{rec['mfu']:.1%} / {rec['mfu_vs_measured_peak']:.1%}"
    gflop = "–" if rec["flops_per_step"] is None else f"{rec['flops_per_step'] / 1e9:,.1f}"
    cols = ["config", "blocks", "sharding", "devices", "batch", "latents", "s/step", "samples/s"]
    cols += ["MFU (spec / measured peak)", "GFLOP/step", "compile s", "peak mem", "state/device", "params"]
    cells = [
        rec["config"],
        blocks_label(rec),
        rec["sharding"] or "none",
        rec["n_devices"],
        rec["batch"],
        "×".join(map(str, rec["latent_shape"])),
    ]
    timed = not rec["compile_only"]
    cells += [f"{rec['seconds_per_step']:.4f}", f"{rec['samples_per_s']:.2f}"] if timed else ["–", "–"]
    cells += [mfu, gflop, f"{rec['compile_s']:.1f}", _bytes(rec["peak_mem_bytes"])]
    cells += [_bytes(rec["state_bytes_per_device"]), f"{rec['params']:,}"]
    first = (
        f"- {rec['steps']} timed steps after {rec['warmup']} warm-up steps, blocked on the last; "
        if timed
        else "- compiled only (`--compile-only`), nothing allocated or run; "
    )
    xla = f"XLA temp buffers {_bytes(rec['xla_temp_bytes'])}, arguments {_bytes(rec['xla_argument_bytes'])}"
    last = f"loss after the last step {rec['final_loss']:.4g}; {xla}." if timed else f"{xla} (this backend's compiler)."
    return "\n".join([
        head, "", vers, "", f"Command: `python benchmarks/train_benchmark.py {shlex.join(argv)}`", "",
        "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|", "| " + " | ".join(map(str, cells)) + " |", "",
        f"{first}text states {'×'.join(map(str, rec['text_shape']))}; bf16 compute, f32 params; "
        f"AdamW + warm-up + clip, EMA; {last}",
        "- GFLOP/step: model FLOPs, XLA's cost analysis of the lowered plain step (blocks unrolled, no remat); "
        "MFU: per-device model FLOPs / step "
        "time / dense bf16 peak. peak mem: the device allocator's peak (n/a on the CPU).",
        f"- state init (`--init {rec['init']}`: random params, Adam moments and EMA, compile included): "
        + ("none (compile only)" if rec["compile_only"]
           else "made once for the first batch size of this process" if rec["state_init_s"] is None
           else f"{rec['state_init_s']:.1f} s"),
        "",
    ])  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["c", "b"], default="c", help="c: the prior (default); b: the decoder")
    ap.add_argument("--config", choices=list(DEFAULTS), default="v2")
    ap.add_argument(
        "--batch", type=int, nargs="+", default=None, help="global batch per step, one or more (default: 8)"
    )
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (default: v2 1024, small 256)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    ap.add_argument("--sharding", choices=["dp", "fsdp"], default="fsdp", help="with more than one device")
    ap.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    ap.add_argument(
        "--init", choices=["normal", "flax"], default="normal", help="random weights: see make_state (default normal)"
    )
    ap.add_argument("--scan-blocks", action="store_true", help="repeated blocks as one lax.scan (one compiled)")
    ap.add_argument("--remat", action="store_true", help="recompute each repeat in the backward pass")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device name)")
    ap.add_argument("--dry-run", action="store_true", help="shapes only: params and state bytes, no compile")
    ap.add_argument(
        "--compile-only", action="store_true", help="compile the step against the abstract state; time nothing"
    )
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to the results files")
    ap.add_argument("--out-dir", default=str(gb.ROOT / "benchmarks"))
    a = ap.parse_args(argv)
    a.batches = a.batch or [DEFAULTS[a.config]["batch"]]
    a.batch = a.batches[0]
    a.res = a.res or DEFAULTS[a.config]["res"]
    if a.steps < 1 or a.warmup < 0 or min(a.batches) < 1:
        ap.error("--steps and --batch must be positive, --warmup non-negative")
    return a


def main(argv=None) -> dict | list[dict]:
    """The record (a list of them for several `--batch` sizes, measured in order in one process)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.dry_run:
        rec = dry_run(a)
        print(
            f"Stage {a.stage.upper()} `{a.config}`: {rec['params']:,} params; train state (params, Adam μ/ν, EMA) "
            f"{_bytes(rec['state_bytes'])}, {_bytes(rec['state_bytes_per_device'])} per device on "
            f"{rec['n_devices']} device(s) (sharding {rec['sharding'] or 'none'}); latents {rec['latent_shape']}, "
            f"text {rec['text_shape']}"
        )
        return rec
    records, state = [], None
    for batch in a.batches:
        try:
            rec, state = benchmark(argparse.Namespace(**{**vars(a), "batch": batch}), state)
        except Exception as err:  # jax's runtime error type moved between versions; the status text did not
            if not is_out_of_memory(err):
                raise
            rec, state = out_of_memory_record(a, batch, err), None
        rec.update(date=gb.utc_now(), versions=versions(), command=shlex.join(argv))
        text = markdown(rec, argv) if "out_of_memory" not in rec else oom_markdown(rec, argv)
        print(text)
        if not a.no_write:  # each batch size as soon as it is measured: a run cut short keeps what it had
            out = Path(a.out_dir)
            gb.append_results_md(out, text)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
        records.append(rec)
        if "out_of_memory" in rec:
            progress(f"batch {batch}: out of memory; larger batch sizes are not tried")
            break
    return records[0] if len(records) == 1 else records


if __name__ == "__main__":
    main()
