"""bf16 against f32 on the same random weights, token ids, initial latents and per-step noise.

Usage (repo root):  python benchmarks/precision_check.py --config v2 [--batch 1] [--res 1024]
The weights are made once in f32 (`generate_benchmark.init_variables`) and cast to bf16 for the bf16 modules. The
two sampling loops are re-run here with `lax.scan` (the body of the pipelines' `run_loop`: CFG 4.0 for the prior,
none for the decoder) so that every step's latents come back: each step's model output and latents are checked
for NaN/Inf, and the two precisions are compared step by step. The f32 run uses matmul precision "highest" (no TF32
on GPUs); the scan replica is checked against the library's own f32 prior loop. Prints a Markdown report, appends it
to `<out-dir>/RESULTS.md`, and prints one `PRECISION_RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_benchmark as gb  # noqa: E402  (also puts the repo root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from wurst_jax.models import abstract_variables  # noqa: E402
from wurst_jax.pipelines.runner import run_loop  # noqa: E402
from wurst_jax.pipelines.text import encode_text  # noqa: E402
from wurst_jax.pipelines.wuerstchen import decode_images, prior_model  # noqa: E402
from wurst_jax.samplers import ddpm_wuerstchen as sc  # noqa: E402

MARK = "PRECISION_RESULT "


def prior_steps(module, variables, x, ts, noise, clip, guidance, cfg):
    """The pipeline's prior loop (CFG) as a scan: per-step latents [S, B, h, w, C] and per-step 'all finite'."""

    def body(x, step):
        t, t_next, eps = step
        r = jnp.full((x.shape[0],), t, jnp.float32)
        out = module.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([r, r]), clip).astype(jnp.float32)
        cond, uncond = jnp.split(out, 2, axis=0)
        out = uncond + guidance * (cond - uncond)
        x = sc.step(out, r, jnp.full_like(r, t_next), x, eps, cfg)
        return x, (x, jnp.isfinite(out).all() & jnp.isfinite(x).all())

    return jax.lax.scan(body, x, (ts[:-1], ts[1:], noise))[1]


def decoder_steps(module, variables, x, ts, noise, effnet, clip, cfg):
    """The pipeline's decoder loop (no guidance) as a scan: per-step latents and per-step 'all finite'."""

    def body(x, step):
        t, t_next, eps = step
        r = jnp.full((x.shape[0],), t, jnp.float32)
        out = module.apply(variables, x, r, effnet, clip).astype(jnp.float32)
        x = sc.step(out, r, jnp.full_like(r, t_next), x, eps, cfg)
        return x, (x, jnp.isfinite(out).all() & jnp.isfinite(x).all())

    return jax.lax.scan(body, x, (ts[:-1], ts[1:], noise))[1]


def cast(tree, like):
    """`tree` with each leaf cast to the dtype of the matching leaf of `like` (numpy on CPU: no casts to compile)."""
    if jax.devices()[0].platform == "cpu":
        return jax.tree_util.tree_map(lambda x, a: jnp.asarray(np.asarray(x).astype(a.dtype)), tree, like)
    return jax.jit(lambda t: jax.tree_util.tree_map(lambda x, a: x.astype(a.dtype), t, like))(tree)


def run(mods, var, inp, cfg) -> dict:
    """Text → prior → decoder → VQGAN at one precision, keeping every intermediate (as float32 numpy)."""
    text = jax.jit(encode_text, static_argnames="module")
    c_p = text(var["text_prior"], *inp["ids_p"], module=mods["text_prior"])
    c_d = text(var["text_decoder"], *inp["ids_d"], module=mods["text_decoder"])
    prior = jax.jit(prior_steps, static_argnums=(0, 7))
    xs_p, ok_p = prior(mods["prior"], var["prior"], inp["x_p"], inp["ts_p"], inp["eps_p"], c_p, inp["w_p"], cfg)
    effnet = xs_p[-1] * 42.0 - 1.0  # the prior pipeline's latent_mean / latent_std
    decoder = jax.jit(decoder_steps, static_argnums=(0, 7))
    xs_d, ok_d = decoder(mods["decoder"], var["decoder"], inp["x_d"], inp["ts_d"], inp["eps_d"], effnet, c_d, cfg)
    images = jax.jit(decode_images, static_argnames="module")(var["vqgan"], xs_d[-1], module=mods["vqgan"])
    out = dict(text_bigG=c_p, text_H=c_d, prior_steps=xs_p, image_embeddings=effnet, decoder_steps=xs_d)
    out = {k: np.asarray(v, np.float32) for k, v in dict(out, images=images).items()}
    out.update(prior_ok=np.asarray(ok_p), decoder_ok=np.asarray(ok_d))
    return out


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.float64) - b)
    scale = float(np.abs(b).max())
    return dict(
        max_abs=float(d.max()), mean_abs=float(d.mean()), ref_max_abs=scale, rel=float(d.max() / max(scale, 1e-30))
    )


def report(a, device: str, res: dict, seconds: float) -> str:
    head = f"## Precision, bf16 vs f32 · {gb.utc_now()} · {device} · config `{a.config}`, {a.res}², batch {a.batch}"
    lines = [head + (f" · {a.label}" if a.label else ""), ""]
    lines += [" · ".join(f"{k} {v}" for k, v in gb.versions().items()), ""]
    lines += ["Same f32-made weights (cast to bf16), token ids, initial latents and per-step noise; f32 matmuls at "
              f"precision `{a.f32_precision}`. Differences are bf16 − f32.", ""]  # fmt: skip
    lines += ["| output | max abs diff | mean abs diff | max abs (f32) | max diff / max abs |", "|---|---|---|---|---|"]
    for k, c in res["diff"].items():
        lines.append(f"| {k} | {c['max_abs']:.3g} | {c['mean_abs']:.3g} | {c['ref_max_abs']:.3g} | {c['rel']:.3g} |")
    psnr = res["images_psnr_db"]
    lines += ["", f"Images: PSNR of bf16 against f32 {psnr:.1f} dB (pixels in [0, 1])."]
    for stage in ("prior", "decoder"):
        steps = res[f"{stage}_step_max_abs"]
        ok = res["finite_steps"][stage]
        per_step = ", ".join(f"{x:.2g}" for x in steps)
        lines.append(
            f"{stage.capitalize()}: finite at every step: f32 {ok['f32']}, bf16 {ok['bf16']} ({len(steps)} steps)"
        )
        lines[-1] += f"; latent max abs diff per step: {per_step}."
    lines.append(f"Scan replica against the pipeline's prior loop (f32): max abs diff {res['replica_max_abs']:.2g}.")
    lines += [
        f"All finite (text, every step, images, both precisions): **{res['all_finite']}**. Ran {seconds:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["v2", "small", "tiny"], default="v2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--res", type=int, default=None, help="pixels per side (default: v2 1024, small 512, tiny 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--f32-precision", choices=["highest", "default"], default="highest")
    ap.add_argument("--label", default="", help="a note for the RESULTS.md section heading")
    ap.add_argument("--out-dir", default=str(gb.ROOT / "benchmarks"))
    a = ap.parse_args(argv)
    a.res = a.res or gb.DEFAULT_RES[a.config]
    t0 = time.perf_counter()
    cfg = gb.configs(a.config)
    m32, m16 = gb.build_modules(cfg, jnp.float32), gb.build_modules(cfg, jnp.bfloat16)
    v32 = {k: gb.init_variables(m, a.seed + i) for i, (k, m) in enumerate(m32.items())}
    v16 = {k: cast(v32[k], abstract_variables(m16[k])) for k in m16}
    inp = gb.make_inputs(cfg, a.batch, a.res, a.seed)
    sched = sc.DDPMWuerstchen()
    with jax.default_matmul_precision(a.f32_precision):
        r32 = run(m32, v32, inp, sched)
        b, clip = a.batch, r32["text_bigG"]
        args = (v32["prior"], inp["x_p"], inp["ts_p"], inp["eps_p"], {"clip": clip[:b]}, {"clip": clip[b:]}, inp["w_p"])
        static = dict(module=m32["prior"], model_fn=prior_model, sampler=sched)
        lib = jax.jit(run_loop, static_argnames=tuple(static))(*args, None, **static)
    r16 = run(m16, v16, inp, sched)
    keys = ("text_bigG", "text_H", "image_embeddings", "images")
    diff = {k: compare(r16[k], r32[k]) for k in keys}
    diff["decoder_latents"] = compare(r16["decoder_steps"][-1], r32["decoder_steps"][-1])
    step_diff = lambda k: [float(np.abs(r16[k][i] - r32[k][i]).max()) for i in range(len(r32[k]))]
    finite = lambda r: (
        all(bool(np.isfinite(r[k]).all()) for k in keys) and r["prior_ok"].all() and r["decoder_ok"].all()
    )
    runs = (("f32", r32), ("bf16", r16))
    res = dict(
        config=a.config, resolution=a.res, batch=a.batch, diff=diff, all_finite=bool(finite(r32) and finite(r16))
    )
    res.update(images_psnr_db=float(10 * np.log10(1.0 / max(np.mean((r16["images"] - r32["images"]) ** 2), 1e-30))))
    res.update(prior_step_max_abs=step_diff("prior_steps"), decoder_step_max_abs=step_diff("decoder_steps"))
    res["finite_steps"] = {s: {p: bool(r[f"{s}_ok"].all()) for p, r in runs} for s in ("prior", "decoder")}
    res["replica_max_abs"] = float(np.abs(np.asarray(lib) - r32["prior_steps"][-1]).max())
    text = report(a, jax.devices()[0].device_kind, res, time.perf_counter() - t0)
    print(text)
    gb.append_results_md(a.out_dir, text)
    print(MARK + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
