"""Text-to-image benchmark: wurst_jax (random weights made on the device) against diffusers eager / torch.compile.

Usage (repo root):  python benchmarks/generate_benchmark.py --config v2 --batch 1 4 8 --reference both
(`--config sc | sc-lite | sc-tiny`: Stable Cascade, see bench_cascade.py; the rest of this text is about v2.)
Per batch size a fresh child process builds the five models from the configs with random weights (no checkpoint,
no torch) and times each stage, median over `--reps` after a warm-up call: text (CLIP bigG on [2B, 77] + CLIP H on
[B, 77], as the reference script), prior (29 steps of DEFAULT_STAGE_C_TIMESTEPS, CFG 4.0), decoder (12 steps, no
guidance), VQGAN decode. The stage functions are the pipelines' own (`run_loop`, one jit each); the text states go
through the host as in the pipeline. `compile_s`: cold trace + lower + compile of those functions.
`pipeline_s`: one whole `WuerstchenPipeline` call (fake tokenizer, noise draws, host transfers). MFU: model FLOPs
from XLA's cost analysis (a loop body counts once: × steps) over time and the device's dense bf16 peak.
`warm_start_s`: a second fresh process sharing the first one's persistent compilation cache, timed from its spawn
to its first images ready (interpreter, imports, random init, one pipeline call). `peak_mem_bytes`: the device
allocator's peak in the measuring process (null on CPU, where the host RSS is recorded instead). The diffusers rows
come from `--reference-script` (one process per batch; CUDA only). Figures are appended to `<out-dir>/RESULTS.md`
and `<out-dir>/results.jsonl`.
On a lent GPU (10-minute commands): carry a diffusers wheel and the reference script in `.whl/`, run one batch size
per command with `--reference-script .whl/diffusers_reference.py --out-dir $OUT/bench`, then append what comes back
to `benchmarks/RESULTS.md` (without its title lines) and `benchmarks/results.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without an install (e.g. on the lent GPU)

import bench_cascade as bc  # noqa: E402  (the Stable Cascade configs)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import append_results_md, utc_now, versions  # noqa: E402, F401  (also used as gb.*)

import wurst_jax as wj  # noqa: E402
from wurst_jax.models import WuerstchenDiffNeXt, WuerstchenPrior, abstract_variables  # noqa: E402
from wurst_jax.pipelines.components import Component  # noqa: E402
from wurst_jax.pipelines.runner import run_loop  # noqa: E402  (the pipelines' own stage functions)
from wurst_jax.pipelines.text import encode_text  # noqa: E402
from wurst_jax.pipelines.wuerstchen import decode_images, decoder_model, prior_model  # noqa: E402
from wurst_jax.samplers import ddpm_wuerstchen as sc  # noqa: E402

MARK = "BENCH_RESULT "
STAGES = ("text", "prior", "decoder", "vqgan")
DECODER_STEPS, PRIOR_GUIDANCE = 12, 4.0
SPEC_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, NVIDIA spec sheets
MEASURED_PEAK = {"H100": 800e12, "H200": 790e12}  # 8192³ bf16 matmul on the lent machines (DESIGN.md, KINDS.md)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
REQUIRED = ("implementation", "device", "date", "batch", "resolution", "img_per_s", "seconds_per_batch")
REQUIRED += ("compile_s", "warm_start_s", "peak_mem_bytes")


def configs(name: str) -> dict:
    """Stage configs and default resolution: v2 = the released models; small / tiny = reduced widths for CPU."""
    if name == "v2":
        text = (wj.CLIPTextConfig.vit_bigg(), wj.CLIPTextConfig.vit_h())
        return dict(prior=wj.StageCConfig.v2(), decoder=wj.StageBConfig.v2(), vqgan=wj.StageAConfig.v2(), text=text)
    if name == "small":
        te = wj.CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
        b = dict(c_cond=256, c_hidden=(64, 128, 256, 256), nhead=(-1, 2, 4, 4), blocks=(1, 2, 3, 1), clip_embd=256)
        return dict(
            prior=wj.StageCConfig(c=384, c_cond=256, depth=4, nhead=6, dropout=0.0),
            decoder=wj.StageBConfig(**b, dropout=0.0),
            vqgan=wj.StageAConfig(bottleneck_blocks=4, embed_dim=96, num_vq_embeddings=1024),
            text=(te, te),
        )
    if name == "tiny":  # the smallest that exercises every block type: compiles in seconds on CPU
        te = wj.CLIPTextConfig(vocab_size=1000, hidden_size=24, intermediate_size=48, num_hidden_layers=1)
        te = dataclasses.replace(te, num_attention_heads=4)
        b = dict(c_r=8, c_cond=24, c_hidden=(8, 16), nhead=(-1, 2), blocks=(1, 1), level_config=("CT", "CTA"))
        return dict(
            prior=dataclasses.replace(wj.StageCConfig.tiny(), depth=1),
            decoder=wj.StageBConfig(**b, inject_effnet=(False, True), clip_embd=24, dropout=0.0),
            vqgan=wj.StageAConfig(bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=64),
            text=(te, te),
        )
    raise ValueError(f"unknown config {name!r}")


DEFAULT_RES = {"v2": 1024, "small": 512, "tiny": 128, **bc.DEFAULT_RES}


class FakeTokenizer:
    """Stands in for CLIPTokenizer (no vocabulary files): words → ids by a stable hash, padded with EOS."""

    model_max_length, bos_token_id, eos_token_id = 77, 0, 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, prompts: list[str], padding="longest", max_length=None, truncation=False, **_):
        words = [[2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()] for text in prompts]
        rows = [[self.bos_token_id, *r, self.eos_token_id][: max_length if truncation else None] for r in words]
        n = max_length if padding == "max_length" else max(map(len, rows))
        ids, mask = np.full((len(rows), n), self.eos_token_id, np.int64), np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return types.SimpleNamespace(input_ids=ids, attention_mask=mask)

    def batch_decode(self, ids):
        return [" ".join(map(str, r)) for r in ids]


def build_modules(cfg: dict, dtype) -> dict:
    return {
        "text_prior": wj.CLIPTextModel(cfg["text"][0], dtype, dtype),
        "text_decoder": wj.CLIPTextModel(cfg["text"][1], dtype, dtype),
        "prior": wj.WuerstchenPrior(cfg["prior"], dtype, dtype),
        "decoder": wj.WuerstchenDiffNeXt(cfg["decoder"], dtype, dtype),
        "vqgan": wj.PaellaVQModel(cfg["vqgan"], dtype, dtype),
    }


def _scaled(z, shape, name):
    """Standard normal → the leaf's init: kernels N(0, 1/fan_in), embeddings N(0, 0.02²), scales and variances
    1 + N(0, 0.05²), the rest (biases, gammas, betas, means) N(0, 0.05²): no branch is an exact identity."""
    if name == "kernel":
        return z / math.sqrt(math.prod(shape[:-1]))
    return z * 0.02 if name == "embedding" else 0.05 * z + (name in ("scale", "var"))


def init_variables(module, seed: int, on_device: bool | None = None):
    """Random variables for `module`, made where they live. On an accelerator (`on_device=None`: any backend but the
    CPU): one jit on the device from one normal draw, nothing on the host. On the CPU the host is the device, and
    numpy leaf by leaf avoids XLA:CPU's slow compile of a many-output init (~25 ms per leaf). The output convs of
    Stages C and B are tamed so their divisors |1 - b| and sigmoid(b) stay away from 0, as in the parity tests (and
    as in trained weights)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables(module))
    device = jax.devices()[0]
    if (device.platform != "cpu") if on_device is None else on_device:
        total = sum(x.size for _, x in leaves)

        def draw(key):
            flat, out, off = jax.random.normal(key, (total,), jnp.float32), [], 0
            for path, x in leaves:
                out.append(_scaled(flat[off : off + x.size].reshape(x.shape), x.shape, path[-1].key).astype(x.dtype))
                off += x.size
            return out

        key = jax.random.key(seed)
        lowered = jax.jit(draw, out_shardings=jax.sharding.SingleDeviceSharding(device)).lower(key)
        try:  # one trivial kernel per leaf: skip the backend's expensive optimisation passes (3× faster on CPU)
            out = lowered.compile(FAST_COMPILE)(key)
        except Exception:  # an XLA that does not know these options
            out = lowered.compile()(key)
    else:
        rng = np.random.default_rng(seed)
        draws = [(_scaled(rng.standard_normal(x.shape, np.float32), x.shape, p[-1].key), x) for p, x in leaves]
        out = [jax.device_put(z.astype(x.dtype), device) for z, x in draws]
    return tame_outputs(module, jax.tree_util.tree_unflatten(treedef, out))


def tame_outputs(module, tree):
    """Random variables of Stages C and B with their output divisors kept away from 0 (see `init_variables`)."""
    if isinstance(module, (WuerstchenPrior, WuerstchenDiffNeXt)):  # output (x - a) / f(b): keep f(b) away from 0
        cfg = module.config
        conv, b, shift = (
            (tree["params"]["out_1"], cfg.c_in, -1.0)  # |1 - b| near 2
            if isinstance(module, WuerstchenPrior)
            else (tree["params"]["clf_1"], cfg.c_out * cfg.patch_size**2, 2.0)  # sigmoid(b) near 0.9
        )
        conv["kernel"], conv["bias"] = conv["kernel"] * 0.25, conv["bias"].at[b:].add(shift)
    return tree


def make_inputs(cfg: dict, batch: int, res: int, seed: int = 0) -> dict:
    """Token ids, initial latents and per-step noise for one batch (the decoder grid is int(ceil(res/42.67)·10.67))."""
    h = math.ceil(res / 42.67)
    hd = int(h * 10.67)
    if hd % cfg["decoder"].downscale:
        raise SystemExit(f"--res {res}: decoder latent {hd} is not a multiple of {cfg['decoder'].downscale}")
    rng = np.random.default_rng(seed)  # small arrays: numpy, so no random-number kernels to compile
    ids = lambda n, te: (jnp.asarray(rng.integers(0, te.vocab_size, (n, 77)), jnp.int32), jnp.ones((n, 77), jnp.int32))
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    ts_p, ts_d = sc.timesteps(timesteps=sc.DEFAULT_STAGE_C_TIMESTEPS), sc.timesteps(DECODER_STEPS)
    c_p, c_d = cfg["prior"].c_in, cfg["decoder"].c_in
    return dict(
        ids_p=ids(2 * batch, cfg["text"][0]), ids_d=ids(batch, cfg["text"][1]),
        x_p=normal(batch, h, h, c_p), eps_p=normal(len(ts_p) - 1, batch, h, h, c_p), ts_p=jnp.asarray(ts_p),
        x_d=normal(batch, hd, hd, c_d), eps_d=normal(len(ts_d) - 1, batch, hd, hd, c_d), ts_d=jnp.asarray(ts_d),
        w_p=jnp.asarray(np.float32(PRIOR_GUIDANCE)), w_d=jnp.asarray(np.float32(0.0)),
    )  # fmt: skip


def _flops(lowered, compiled) -> float | None:
    for obj in (lowered, compiled):  # best effort: the format differs between jax versions and backends
        try:
            ca = obj.cost_analysis()
            total = sum(float(c.get("flops", 0.0)) for c in (ca if isinstance(ca, (list, tuple)) else [ca]) if c)
            if total > 0:
                return total
        except Exception:
            pass
    return None


class Stages:
    """Each stage function jitted and compiled explicitly: cold compile timed, FLOPs and temp memory read once."""

    def __init__(self):
        self.exe, self.compile_s, self.flops, self.temp_bytes = {}, {}, {}, {}

    def __call__(self, name, fn, static: dict, *args):
        if name not in self.exe:
            t0 = time.perf_counter()
            lowered = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static)
            self.exe[name] = lowered.compile()
            self.compile_s[name] = time.perf_counter() - t0
            self.flops[name] = _flops(lowered, self.exe[name])
            self.temp_bytes[name] = getattr(self.exe[name].memory_analysis(), "temp_size_in_bytes", None)
        return jax.block_until_ready(self.exe[name](*args))


def run_once(st: Stages, mods: dict, var: dict, inp: dict) -> tuple[dict, jax.Array]:
    """One text-to-image batch, stage by stage; text states pass the host as in the pipeline."""
    t, t0, cfg = {}, time.perf_counter(), sc.DDPMWuerstchen()
    c_p = st("text_prior", encode_text, {"module": mods["text_prior"]}, var["text_prior"], *inp["ids_p"])
    c_d = st("text_decoder", encode_text, {"module": mods["text_decoder"]}, var["text_decoder"], *inp["ids_d"])
    c_p, c_d = jnp.asarray(np.asarray(c_p)), jnp.asarray(np.asarray(c_d))
    t["text"] = (t1 := time.perf_counter()) - t0
    b = inp["x_p"].shape[0]
    static = {"module": mods["prior"], "model_fn": prior_model, "sampler": cfg}
    args = (var["prior"], inp["x_p"], inp["ts_p"], inp["eps_p"], {"clip": c_p[:b]}, {"clip": c_p[b:]}, inp["w_p"])
    lat = st("prior", run_loop, static, *args, None)
    t["prior"] = (t2 := time.perf_counter()) - t1
    effnet = lat * 42.0 - 1.0  # the prior pipeline's latent_mean / latent_std
    static = {"module": mods["decoder"], "model_fn": decoder_model, "sampler": cfg}
    cond = {"effnet": effnet, "clip": c_d}
    args = (var["decoder"], inp["x_d"], inp["ts_d"], inp["eps_d"], cond, None, inp["w_d"], None)
    lat = st("decoder", run_loop, static, *args)
    t["decoder"] = (t3 := time.perf_counter()) - t2
    img = st("vqgan", decode_images, {"module": mods["vqgan"]}, var["vqgan"], lat)
    t["vqgan"] = time.perf_counter() - t3
    return t, img


def make_pipeline(cfg: dict, mods: dict, var: dict) -> wj.WuerstchenPipeline:
    c = {k: Component(m, var[k]) for k, m in mods.items()}
    tok_p, tok_d = (FakeTokenizer(te.vocab_size) for te in cfg["text"])
    prior = wj.WuerstchenPriorPipeline(tok_p, c["text_prior"], c["prior"], progress=False)
    decoder = wj.WuerstchenDecoderPipeline(tok_d, c["text_decoder"], c["decoder"], c["vqgan"], progress=False)
    # the loops run the modules as given (scanned or not), not the runners' defaults: the same programs as run_once
    prior.runner.scan_blocks, decoder.runner.scan_blocks = mods["prior"].scan_blocks, mods["decoder"].scan_blocks
    return wj.WuerstchenPipeline(prior, decoder)


def generate(pipe: wj.WuerstchenPipeline, batch: int, res: int) -> np.ndarray:
    kw = dict(prior_timesteps=list(wj.DEFAULT_STAGE_C_TIMESTEPS), prior_guidance_scale=PRIOR_GUIDANCE, seed=0)
    kw.update(height=res, width=res, num_inference_steps=DECODER_STEPS, num_images_per_prompt=batch)
    return pipe("a photo of a cat", output_type="np", **kw).images


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(peak_mem_bytes=stats.get("peak_bytes_in_use"), peak_host_rss_bytes=rss)


def child(a) -> dict:
    """One batch size in this fresh process: `measure` times the stages and the pipeline, `warm` one pipeline call."""
    if a.config in bc.CONFIGS:  # Stable Cascade: timed through its pipelines (bench_cascade.py)
        return bc.child(a, sys.modules[__name__])
    wj.enable_compilation_cache(a.cache_dir)
    t_imported, batch, cfg = time.time(), a.batch[0], configs(a.config)
    mods = build_modules(cfg, {"bf16": jnp.bfloat16, "f32": jnp.float32}[a.dtype])
    var = jax.block_until_ready({k: init_variables(m, i) for i, (k, m) in enumerate(mods.items())})
    init_s = time.time() - t_imported
    if a.child == "warm":
        images = generate(make_pipeline(cfg, mods, var), batch, a.res)
        finite = bool(np.isfinite(images).all())
        return dict(ready_at=time.time(), imports_done_at=t_imported, init_s=init_s, finite=finite, **memory())
    st, inp = Stages(), make_inputs(cfg, batch, a.res)
    t0 = time.perf_counter()
    run_once(st, mods, var, inp)  # compiles: the warm-up call
    first = time.perf_counter() - t0 - sum(st.compile_s.values())
    runs = [run_once(st, mods, var, inp) for _ in range(a.reps)]
    pipe = make_pipeline(cfg, mods, var)
    pipe_first, *pipe_s = (timed(generate, pipe, batch, a.res) for _ in range(a.reps + 1))
    steps = dict(text_prior=1, text_decoder=1, prior=len(inp["eps_p"]), decoder=len(inp["eps_d"]), vqgan=1)
    flops = {k: f and f * steps[k] / batch for k, f in st.flops.items()}  # per image
    text = None if None in (flops["text_prior"], flops["text_decoder"]) else flops["text_prior"] + flops["text_decoder"]
    dev, img = jax.devices()[0], runs[-1][1]
    out = dict(device=dev.device_kind, platform=dev.platform, compile_s=sum(st.compile_s.values()))
    out.update(stage_s={s: statistics.median(r[0][s] for r in runs) for s in STAGES}, compile_stage_s=st.compile_s)
    out.update(first_call_s=first, init_s=init_s, flops_per_image={"text": text, **{s: flops[s] for s in STAGES[1:]}})
    out.update(xla_temp_bytes=st.temp_bytes, pipeline_s=statistics.median(pipe_s), pipeline_first_call_s=pipe_first)
    out.update(finite=bool(jnp.isfinite(img).all()), image_shape=list(img.shape), **memory())
    out.update(params={k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in var.items()})
    return out


def spawn(a, batch: int, mode: str, cache_dir: str) -> tuple[dict, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--cache-dir", cache_dir]
    cmd += ["--config", a.config, "--batch", str(batch), "--res", str(a.res), "--dtype", a.dtype, "--reps", str(a.reps)]
    cmd += ["--steps", *map(str, a.steps)] if a.steps else []
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode or not lines:
        raise SystemExit(f"benchmark child ({mode}, batch {batch}) failed:\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK) :]), t0


def jax_row(a, batch: int) -> dict:
    """wurst_jax at one batch size: a measuring process, then a warm-start one on the same (fresh) compile cache."""
    with tempfile.TemporaryDirectory(prefix="wurst_jax_cache_") as cache:
        m, _ = spawn(a, batch, "measure", cache)
        w, t0 = (None, None) if a.no_warm_start else spawn(a, batch, "warm", cache)
    total = sum(t for t in m["stage_s"].values() if t is not None)  # Stable Cascade: text, vqgan null
    row = dict(implementation="wurst_jax", device=m.pop("device"), batch=batch, resolution=a.res)
    row.update(img_per_s=batch / total, seconds_per_batch=total, compile_s=m.pop("compile_s"))
    row.update(warm_start_s=None if w is None else w["ready_at"] - t0, peak_mem_bytes=m.pop("peak_mem_bytes"), **m)
    if w is not None:
        gen = w["ready_at"] - w["imports_done_at"] - w["init_s"]
        row["warm_start"] = dict(startup_s=w["imports_done_at"] - t0, init_s=w["init_s"], generate_s=gen)
        row["warm_start"].update(peak_mem_bytes=w["peak_mem_bytes"], finite=w["finite"])
    return row


_REF_WRAPPER = """import json, runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
import torch  # after the run: the CUDA allocator's peak over it
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"peak_mem_bytes": peak}), flush=True)
"""


def reference_rows(a) -> tuple[list[dict], list[str]]:
    """diffusers rows, one process per (mode, batch) so each peak is its own; a failure is reported, not fatal."""
    modes = {"none": [], "eager": ["eager"], "compile": ["compile"], "both": ["eager", "compile"]}[a.reference]
    script = Path(a.reference_script)
    if not modes:
        return [], ["diffusers reference not run (--reference none)"]
    if a.config in bc.CONFIGS:
        return [], ["diffusers reference skipped: no StableCascadeCombinedPipeline reference script yet"]
    if a.config != "v2":
        return [], ["diffusers reference skipped: its script builds the full-size v2 models only (--config v2)"]
    if not script.is_file():
        return [], [f"diffusers reference skipped: {script} not found (pass --reference-script)"]
    rows, notes = [], []
    for mode in modes:
        for b in sorted(a.batch):
            cmd = [sys.executable, "-c", _REF_WRAPPER, str(script), "--batch", str(b), "--res", str(a.res)]
            cmd += ["--reps", str(a.reps), "--dtype", "bf16"] + (["--compile"] if mode == "compile" else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            objs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
            info, got = next((o for o in objs if "params" in o), {}), next((o for o in objs if "batch" in o), None)
            if p.returncode or got is None:
                why = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
                notes.append(f"diffusers-{mode} batch {b} skipped: the reference script failed ({why})")
                break
            med, first = got["median_s"], got["warmup_s"]
            row = dict(implementation=f"diffusers-{mode}", device=info.get("gpu"), batch=b, resolution=a.res)
            row.update(img_per_s=b / med["total"], seconds_per_batch=med["total"], warm_start_s=None)
            row.update(compile_s=first - med["total"] if mode == "compile" else None, first_call_s=first)
            row.update(peak_mem_bytes=next((o["peak_mem_bytes"] for o in objs if "peak_mem_bytes" in o), None))
            row.update(stage_s={s: med[s] for s in STAGES}, finite=got["finite"], params=info.get("params"))
            rows.append(row)
    return rows, notes


def device_peak(device_kind: str | None, table: dict = SPEC_PEAK, override_tflops: float | None = None):
    """Dense bf16 FLOP/s of a device (by its `device_kind`, e.g. "NVIDIA H100 80GB HBM3") from `table`, None if
    unknown (a CPU); `override_tflops` (--peak-tflops), if given, wins."""
    if override_tflops:
        return override_tflops * 1e12
    return next((v for k, v in table.items() if k in (device_kind or "")), None)


def finish_rows(a, rows: list[dict], out: Path) -> list[dict]:
    """Common keys (date, config, versions) and MFU; the reference rows use wurst_jax's FLOPs for the same work."""
    flops = next((r["flops_per_image"] for r in rows if r.get("flops_per_image")), None)
    for path in (out / "results.jsonl", ROOT / "benchmarks/results.jsonl"):  # reference-only: an earlier jax run's
        if flops is None and path.is_file():
            old = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            same = [r for r in old if r.get("config") == a.config and r.get("resolution") == a.res]
            flops = next((r["flops_per_image"] for r in reversed(same) if r.get("flops_per_image")), None)
    per_image = None if not flops or None in flops.values() else sum(flops.values())
    date, vers = utc_now(), versions()
    for r in rows:
        r.update(date=date, config=a.config, dtype=a.dtype if r["implementation"] == "wurst_jax" else "bf16")
        r.update(reps=a.reps, versions=vers, model_flops_per_image=per_image, label=a.label or None)
        for key, table in (("mfu", SPEC_PEAK), ("mfu_vs_measured_peak", MEASURED_PEAK)):
            peak = device_peak(r["device"], table, a.peak_tflops)
            r[key] = per_image * r["batch"] / r["seconds_per_batch"] / peak if per_image and peak else None
    return rows


def _f(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(a, rows: list[dict], notes: list[str]) -> str:
    device = rows[0]["device"] if rows else "no device"
    head = f"## Generation · {utc_now()} · {device} · config `{a.config}`, {a.res}², {a.dtype}" + (
        f" · {a.label}" if a.label else ""
    )
    lines = [head, "", " · ".join(f"{k} {v}" for k, v in versions().items()) + f" · {os.cpu_count()} host CPUs", ""]
    lines += [f"Command: `python benchmarks/generate_benchmark.py {shlex.join(sys.argv[1:])}`", ""]
    cols = "implementation|batch|text s|prior s|decoder s|VQGAN s|total s|img/s|MFU (spec / measured peak)|compile s"
    lines += [f"| {cols.replace('|', ' | ')} | warm start s | peak mem GiB | pipeline call s |", "|---" * 13 + "|"]
    for r in rows:
        mem = _f(r["peak_mem_bytes"] and r["peak_mem_bytes"] / 2**30, ".2f")
        if r["peak_mem_bytes"] is None and r.get("peak_host_rss_bytes"):
            mem = f"host RSS {r['peak_host_rss_bytes'] / 2**30:.2f}"
        mfu = "–" if r["mfu"] is None else f"{r['mfu']:.1%} / {r['mfu_vs_measured_peak']:.1%}"
        cells = [r["implementation"], r["batch"], *(_f(r["stage_s"][s]) for s in STAGES), _f(r["seconds_per_batch"])]
        cells += [_f(r["img_per_s"], ".2f"), mfu, _f(r["compile_s"], ".1f"), _f(r["warm_start_s"], ".1f"), mem]
        lines.append("| " + " | ".join(map(str, [*cells, _f(r.get("pipeline_s"))])) + " |")
    flops = next((r["flops_per_image"] for r in rows if r.get("flops_per_image")), None)
    if flops:
        gflop = ", ".join(f"{k} {_f(v and v / 1e9, '.2f')}" for k, v in flops.items())
        lines += ["", f"Model GFLOP per image (XLA cost analysis × steps): {gflop}"]
    params = next((r["params"] for r in rows if r["implementation"] == "wurst_jax"), None)
    lines += ["", "Parameters: " + ", ".join(f"{k} {n:,}" for k, n in params.items())] if params else []
    lines += [""] + [f"- {n}" for n in notes] + [
        "- Stage times: medians over the reps after a warm-up call; total = their sum; img/s = batch / total.",
        "- compile s: cold trace + lower + compile of the stage functions (diffusers-compile: first call − median).",
        "- warm start s: a new process on the compilation cache the first one filled, from its spawn to the first "
        "images ready (Python start, imports, random init on the device, one pipeline call, cache loads included).",
        "- peak mem: the device allocator's peak in the measuring process (weights + activations + XLA workspace).",
        "- pipeline call s: one `WuerstchenPipeline` call (tokenizer, noise draws, host transfers included).",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["v2", "small", "tiny", *bc.CONFIGS], default="v2")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--res", type=int, default=None, help="pixels per side (default: v2 1024, small 512, tiny 128)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs=2, default=None, help="sc configs: prior, decoder steps (default 20 10)")
    ap.add_argument("--reference", choices=["none", "eager", "compile", "both"], default="none")
    ap.add_argument("--reference-script", default=str(ROOT.parent / "shared/bench/diffusers_reference.py"))
    ap.add_argument("--skip-jax", action="store_true", help="only the diffusers reference rows")
    ap.add_argument("--no-warm-start", action="store_true", help="skip the second (warm-cache) process")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device name)")
    ap.add_argument("--label", default="", help="a note for the RESULTS.md section heading")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    ap.add_argument("--child", choices=["measure", "warm"], help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.res = a.res or DEFAULT_RES[a.config]
    if a.child:
        print(MARK + json.dumps(child(a)), flush=True)
        return
    rows = [] if a.skip_jax else [jax_row(a, b) for b in sorted(a.batch)]
    refs, notes = reference_rows(a)
    notes += [bc.NOTE] if a.config in bc.CONFIGS else []
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = finish_rows(a, rows + refs, out)
    text = markdown(a, rows, notes)
    print(text)
    append_results_md(out, text)
    with (out / "results.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
