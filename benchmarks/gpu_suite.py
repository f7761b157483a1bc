"""The whole GPU measurement as one command: wurst_jax v2 at 1024² and the diffusers reference, most important first.

Usage (repo root, on a fresh GPU machine, inside one 10-minute call):
    python benchmarks/gpu_suite.py --out $OUT/suite            # full size, v2 at 1024², bf16
    python benchmarks/gpu_suite.py --short --out /tmp/suite    # tiny config on CPU, end to end in seconds

Rows, in this order, each printed and appended to `<out>/results.jsonl` the moment it is measured (a run cut short
by its time limit keeps what it got; `--budget-s` stops starting new work so the rows that matter are written):
 1. `cold` batch 1: a fresh process (random weights made on the device leaf by leaf from `jax.eval_shape`: no Flax
    init of 2 B parameters) compiles the stage functions (cold trace + lower + compile, `compile_s`) and makes the
    first images; `first_images_s` counts from the process's spawn (interpreter, imports, init included).
 2. `steady` batch 1: the same process, median of `--reps` calls: s per image, img/s, stage times, peak memory.
 3. `warm_start` batch 1: a second fresh process on the persistent compilation cache the first filled (kept under
    `<out>/jax_cache`), from its spawn to its first images out of one `WuerstchenPipeline` call.
 4. `cold` and `steady` batch 4 (a fresh process).
 5. diffusers eager batch 1 and 4 (`benchmarks/diffusers_reference.py` in its own process per batch), or one row
    saying why it could not run (no torch with CUDA, no diffusers).
 6. Stable Cascade (`--sc-config`, default `sc`: stage C + B + VQGAN at 1024², 20 + 10 steps) batch 1, one
    `cascade` row (generate_benchmark's sc child: warm-up call → `compile_s`, then prior / decoder pipeline calls).
 7. with the time left: `cold` and `steady` batch 1 with no block scanned and with the decoder's scanned too (rows
    carry `scan_blocks`: `default` = the pipelines' choice, nothing scanned; `prior`; `all`).
Every row carries device, date, the jax/jaxlib/flax/torch/diffusers versions, config, batch, resolution and dtype.
The stage functions and helpers are `generate_benchmark.py`'s (the pipelines' own `run_loop`, one jit per stage).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import generate_benchmark as gb  # noqa: E402  (imports jax, but the parent never touches a device)

MARK = "SUITE_ROW "
REF_CHECK = "import torch, diffusers; assert torch.cuda.is_available(), 'torch has no CUDA device'"


# --- the measuring children (fresh processes; they own the device) ---------------------------------------------


def fast_init(module, seed: int, on_device: bool | None = None):
    """Random variables, one `jax.random.normal` per leaf made on the device (one small compile per distinct leaf
    shape: 75 at full size, persisted by the compilation cache), scaled as `generate_benchmark._scaled`; no Flax
    init, no host copy. On the CPU (`on_device=None`) numpy draws leaf by leaf, as `init_variables` does: the host
    is the device there, and XLA:CPU compiles each small program slower than numpy fills it."""
    import math

    import jax

    from wurst_jax.models import abstract_variables

    if not (jax.devices()[0].platform != "cpu" if on_device is None else on_device):
        return gb.init_variables(module, seed, on_device=False)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables(module))
    key = jax.random.key(seed)
    out = []
    for i, (path, x) in enumerate(leaves):
        name = path[-1].key
        scale = 1 / math.sqrt(math.prod(x.shape[:-1])) if name == "kernel" else 0.02 if name == "embedding" else 0.05
        shift = 1.0 if name in ("scale", "var") else 0.0
        out.append(_leaf(jax.random.fold_in(key, i), x.shape, x.dtype, scale, shift))
    return gb.tame_outputs(module, jax.tree_util.tree_unflatten(treedef, out))


def _leaf(key, shape, dtype, scale, shift):
    import jax

    global _LEAF_FN
    if "_LEAF_FN" not in globals():
        _LEAF_FN = jax.jit(
            lambda k, a, b, shape, dtype: (jax.random.normal(k, shape) * a + b).astype(dtype),
            static_argnames=("shape", "dtype"),
        )
    return _LEAF_FN(key, scale, shift, shape=tuple(shape), dtype=dtype)


def emit(row: dict) -> None:
    print(MARK + json.dumps(row), flush=True)


def child(a) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import wurst_jax as wj

    if a.config in gb.bc.CONFIGS:  # Stable Cascade: generate_benchmark's child (pipeline calls, bench_cascade.py)
        a.batch, a.steps, a.child = [a.batch], None, "measure"
        m = gb.bc.child(a, gb)
        total = m["stage_s"]["prior"] + m["stage_s"]["decoder"]
        emit(
            dict(
                m, row="cascade", seconds_per_batch=total, s_per_image=total / a.batch[0], img_per_s=a.batch[0] / total
            )
        )
        return
    wj.enable_compilation_cache(a.cache_dir)
    t_imported, cfg = time.time(), gb.configs(a.config)
    mods = gb.build_modules(cfg, {"bf16": jnp.bfloat16, "f32": jnp.float32}[a.dtype])
    from wurst_jax.pipelines.runner import SCAN_BLOCKS  # the pipelines' defaults: what users run

    choices = {"all": dict(prior=True, decoder=True), "prior": dict(prior=True), "none": {}}
    scan = choices.get(a.scan_blocks, SCAN_BLOCKS)
    mods = {k: m.clone(scan_blocks=scan.get(k, False)) if k in ("prior", "decoder") else m for k, m in mods.items()}
    var = jax.block_until_ready({k: fast_init(m, i) for i, (k, m) in enumerate(mods.items())})
    dev = jax.devices()[0]
    base = dict(device=dev.device_kind, platform=dev.platform, batch=a.batch, startup_s=t_imported - a.spawned_at)
    base.update(init_s=time.time() - t_imported, scan_blocks=a.scan_blocks)
    if a.child == "warm":
        images = gb.generate(gb.make_pipeline(cfg, mods, var), a.batch, a.res)
        ready = time.time()
        emit(dict(base, row="warm_start", warm_start_s=ready - a.spawned_at, finite=bool(np.isfinite(images).all())))
        return
    st, inp = gb.Stages(), gb.make_inputs(cfg, a.batch, a.res)
    t0 = time.perf_counter()
    _, img = gb.run_once(st, mods, var, inp)  # compiles: the cold call
    compile_s = sum(st.compile_s.values())
    row = dict(base, row="cold", compile_s=compile_s, compile_stage_s=st.compile_s, first_images_s=time.time())
    row.update(first_call_s=time.perf_counter() - t0 - compile_s, finite=bool(jnp.isfinite(img).all()))
    row["first_images_s"] -= a.spawned_at
    emit(dict(row, **gb.memory()))
    runs = [gb.run_once(st, mods, var, inp)[0] for _ in range(a.reps)]
    stage_s = {s: statistics.median(r[s] for r in runs) for s in gb.STAGES}
    total = sum(stage_s.values())
    row = dict(base, row="steady", seconds_per_batch=total, s_per_image=total / a.batch, img_per_s=a.batch / total)
    row.update(stage_s=stage_s, reps=a.reps, xla_temp_bytes=st.temp_bytes, compile_s=compile_s)
    row.update(params={k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in var.items()})
    emit(dict(row, **gb.memory()))
    if a.pipeline:  # one pipeline call, so the warm process finds the pipeline's programs in the cache
        t0 = time.perf_counter()
        gb.generate(gb.make_pipeline(cfg, mods, var), a.batch, a.res)
        emit(dict(base, row="pipeline_first_call", pipeline_first_call_s=time.perf_counter() - t0, **gb.memory()))


# --- the parent: runs the children in order, streams their rows, keeps the time budget ---------------------------


class Suite:
    def __init__(self, a):
        self.a, self.t0 = a, time.time()
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = self.out / "jax_cache"
        self.common = dict(date=gb.utc_now(), versions=gb.versions(), config=a.config, resolution=a.res)
        self.common.update(label=a.label or None)

    def left(self) -> float:
        return self.a.budget_s - (time.time() - self.t0)

    def write(self, row: dict) -> dict:
        row = {**self.common, **row}
        with (self.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    def stream(self, cmd: list[str], what: dict, env: dict | None = None) -> list[dict]:
        """Run `cmd`, writing each `MARK` row the moment it is printed; a failure or timeout becomes a row too."""
        if self.left() < 5:
            return [self.write(dict(what, skipped=f"no time left in the {self.a.budget_s:.0f} s budget"))]
        rows, deadline = [], time.time() + self.left()
        # its own process group, so the time limit also ends what it started (the reference's own process)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                             start_new_session=True)  # fmt: skip
        err: list[str] = []
        threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()  # drain: no pipe deadlock
        timer = threading.Timer(max(deadline - time.time(), 1), lambda: os.killpg(p.pid, signal.SIGKILL))
        timer.start()
        for line in p.stdout:
            if line.startswith(MARK):
                rows.append(self.write(dict(what, **json.loads(line[len(MARK) :]))))
        rc = p.wait()
        timer.cancel()
        if rc:
            why = "killed at the time budget" if time.time() >= deadline - 1 else f"exit {rc}"
            tail = "".join(err[-20:])[-2000:]
            rows.append(self.write(dict(what, row="failed", failed=why, stderr_tail=tail)))
        return rows

    def jax(self, batch: int, mode: str, scan: str | None = None) -> list[dict]:
        a, scan = self.a, scan or self.a.scan_blocks
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--cache-dir", str(self.cache)]
        cmd += ["--config", a.config, "--batch", str(batch), "--res", str(a.res), "--dtype", a.dtype]
        cmd += ["--reps", str(a.reps), "--spawned-at", repr(time.time())]
        cmd += ["--scan-blocks", scan] + ["--pipeline"] * (mode == "measure" and batch == 1 and scan == a.scan_blocks)
        return self.stream(cmd, dict(implementation="wurst_jax", batch=batch, dtype=a.dtype))

    def cascade(self, batch: int) -> list[dict]:
        """Stable Cascade (`--sc-config`) at its default resolution: compile (warm-up call) and steady rows in one."""
        a, res = self.a, gb.DEFAULT_RES[self.a.sc_config]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "measure", "--cache-dir", str(self.cache)]
        cmd += ["--config", a.sc_config, "--batch", str(batch), "--res", str(res), "--dtype", a.dtype]
        cmd += ["--reps", str(a.reps)]
        return self.stream(
            cmd, dict(implementation="wurst_jax", batch=batch, dtype=a.dtype, config=a.sc_config, resolution=res)
        )

    def reference(self, batch: int) -> list[dict]:
        what = dict(implementation="diffusers-eager", batch=batch, dtype="bf16", row="steady")
        script = Path(self.a.reference_script)
        if self.a.config != "v2":
            return [self.write(dict(what, skipped="the reference builds the full-size v2 models only (not --short)"))]
        if not script.is_file():
            return [self.write(dict(what, skipped=f"{script} not found"))]
        check = subprocess.run([sys.executable, "-c", REF_CHECK], capture_output=True, text=True)
        if check.returncode:
            why = (check.stderr.strip().splitlines() or ["unknown"])[-1][:300]
            return [self.write(dict(what, skipped=f"torch with CUDA and diffusers needed: {why}"))]
        cmd = [sys.executable, "-c", gb._REF_WRAPPER, str(script), "--batch", str(batch), "--res", str(self.a.res)]
        cmd += ["--reps", str(self.a.reps), "--dtype", "bf16"]
        wrapped = [sys.executable, str(Path(__file__).resolve()), "--wrap-reference", "--", *cmd]
        return self.stream(wrapped, what)

    def run(self) -> None:
        self.jax(1, "measure")
        self.jax(1, "warm")
        self.jax(4, "measure")
        self.reference(1)
        self.reference(4)
        if self.a.sc_config != "none" and not self.a.short:  # after every v2 row: Stable Cascade, batch 1
            self.cascade(1)
        if self.a.scan_blocks == "default" and not self.a.short:  # what time is left: the other scan choices, b1
            self.jax(1, "measure", "prior")
            self.jax(1, "measure", "all")
        print(f"gpu_suite: done in {time.time() - self.t0:.1f} s; rows in {self.out / 'results.jsonl'}", flush=True)


def wrap_reference(cmd: list[str]) -> None:
    """Turn the reference script's JSON lines into suite rows (stage medians, first call, peak memory)."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr[-4000:])
    objs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    info = next((o for o in objs if "params" in o), {})
    peak = next((o["peak_mem_bytes"] for o in objs if "peak_mem_bytes" in o), None)
    for got in (o for o in objs if "batch" in o):
        med = got["median_s"]
        row = dict(device=info.get("gpu"), seconds_per_batch=med["total"], s_per_image=med["total"] / got["batch"])
        row.update(img_per_s=got["batch"] / med["total"], first_call_s=got["warmup_s"], finite=got["finite"])
        row.update(stage_s={s: med[s] for s in gb.STAGES}, peak_mem_bytes=peak, params=info.get("params"))
        emit(row)
    sys.exit(p.returncode)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="tiny config at 128², f32, 1 rep: a CPU check in seconds")
    ap.add_argument(
        "--config", choices=["v2", "small", "tiny", *gb.bc.CONFIGS], default=None, help="default v2 (--short: tiny)"
    )
    ap.add_argument("--res", type=int, default=None, help="pixels per side (default: v2 1024, small 512, tiny 128)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default=None, help="default bf16 (--short: f32)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls after the cold one (default 3, --short 1)")
    ap.add_argument(
        "--scan-blocks",
        choices=["default", "prior", "all", "none"],
        default="default",
        help="repeated blocks as one lax.scan: the pipelines' default (none), the prior's, prior and decoder, or none",
    )
    ap.add_argument(
        "--sc-config", choices=[*gb.bc.CONFIGS, "none"], default="sc", help="Stable Cascade row (not --short)"
    )
    ap.add_argument("--budget-s", type=float, default=570.0, help="start no work after this many seconds")
    ap.add_argument("--reference-script", default=str(ROOT / "benchmarks" / "diffusers_reference.py"))
    ap.add_argument("--label", default="", help="a note stored in every row")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder of results.jsonl and jax_cache/")
    ap.add_argument("--child", choices=["measure", "warm"], help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--wrap-reference", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.wrap_reference:
        return wrap_reference(a.rest)
    a.config = a.config or ("tiny" if a.short else "v2")
    a.dtype = a.dtype or ("f32" if a.short else "bf16")
    a.reps = a.reps or (1 if a.short else 3)
    a.res = a.res or gb.DEFAULT_RES[a.config]
    if a.child:
        a.spawned_at = a.spawned_at or time.time()
        return child(a)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # children: the peak is what they allocate
    Suite(a).run()


if __name__ == "__main__":
    main()
