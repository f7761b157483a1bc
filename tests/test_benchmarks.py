"""The benchmark scripts at the tiny config on CPU: they run end to end, write the documented records, and the
precision check finds finite outputs. Times are only checked for sign and consistency, never for speed."""

import datetime
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"implementation", "device", "date", "batch", "resolution", "img_per_s", "seconds_per_batch", "compile_s"}
REQUIRED |= {"warm_start_s", "peak_mem_bytes"}
STAGES = {"text", "prior", "decoder", "vqgan"}


def run_script(name: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_benchmark_tiny(tmp_path):
    args = ("--config", "tiny", "--batch", "2", "1", "--reps", "1", "--reference", "none", "--out-dir", str(tmp_path))
    stdout = run_script("generate_benchmark.py", *args)
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [r["batch"] for r in rows] == [1, 2]  # ascending, one row per configuration
    for r in rows:
        assert REQUIRED <= r.keys()
        assert r["implementation"] == "wurst_jax" and r["resolution"] == 128 and r["config"] == "tiny"
        datetime.datetime.strptime(r["date"], "%Y-%m-%dT%H:%M:%SZ")
        assert r["stage_s"].keys() == STAGES and all(t > 0 for t in r["stage_s"].values())
        assert r["seconds_per_batch"] == pytest.approx(sum(r["stage_s"].values()))
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["seconds_per_batch"])
        assert r["compile_s"] > 0 and r["warm_start_s"] > 0 and r["pipeline_s"] > 0
        assert r["warm_start_s"] >= sum(r["warm_start"][k] for k in ("init_s", "generate_s"))
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0  # None: the CPU has no allocator stats
        assert r["peak_host_rss_bytes"] > 0
        assert r["finite"] and r["warm_start"]["finite"] and r["image_shape"] == [r["batch"], 128, 128, 3]
        assert all(f > 0 for f in r["flops_per_image"].values())
        assert r["mfu"] is None  # no known peak for a CPU
    md = (tmp_path / "RESULTS.md").read_text()
    assert (
        md.startswith("# Benchmark results")
        and "## Generation · " in md
        and "| wurst_jax | 1 |" in md
        and "| wurst_jax | 2 |" in md
    )
    assert "diffusers reference not run" in stdout


FAKE_REFERENCE = """
import json, sys
batch = int(sys.argv[sys.argv.index("--batch") + 1])
print(json.dumps({"params": {"prior": 1}, "torch": "x", "gpu": "NVIDIA H100 80GB HBM3", "compile": False}))
med = {"text": 0.1, "prior": 1.0, "decoder": 0.5, "vqgan": 0.2, "total": 1.8}
print(json.dumps({"batch": batch, "warmup_s": 5.0, "median_s": med, "finite": True, "img": [batch, 3, 8, 8]}))
"""


def test_reference_rows_parsed(tmp_path):
    """The diffusers rows come from the reference script's JSON lines (here a stand-in that needs no GPU)."""
    script = tmp_path / "fake_reference.py"
    script.write_text(textwrap.dedent(FAKE_REFERENCE))
    args = ("--config", "v2", "--skip-jax", "--batch", "4", "--reference", "both", "--reps", "1")
    run_script("generate_benchmark.py", *args, "--reference-script", str(script), "--out-dir", str(tmp_path))
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert [(r["implementation"], r["batch"]) for r in rows] == [("diffusers-eager", 4), ("diffusers-compile", 4)]
    for r in rows:
        assert REQUIRED <= r.keys() and r["resolution"] == 1024 and r["seconds_per_batch"] == 1.8
        assert r["img_per_s"] == pytest.approx(r["batch"] / 1.8)
        assert r["compile_s"] == (pytest.approx(3.2) if r["implementation"] == "diffusers-compile" else None)
        assert r["device"] == "NVIDIA H100 80GB HBM3" and r["warm_start_s"] is None
    assert "| diffusers-compile | 4 |" in (tmp_path / "RESULTS.md").read_text()


def test_reference_skipped_when_not_full_size(tmp_path):
    args = ("--config", "tiny", "--skip-jax", "--reference", "eager", "--out-dir", str(tmp_path))
    assert "full-size v2 models only" in run_script("generate_benchmark.py", *args)
    assert read_jsonl(tmp_path / "results.jsonl") == []


def test_precision_check_tiny(tmp_path):
    stdout = run_script("precision_check.py", "--config", "tiny", "--batch", "2", "--out-dir", str(tmp_path))
    line = next(ln for ln in stdout.splitlines() if ln.startswith("PRECISION_RESULT "))
    res = json.loads(line.split(" ", 1)[1])
    assert res["all_finite"] and res["finite_steps"] == {s: {"f32": True, "bf16": True} for s in ("prior", "decoder")}
    assert len(res["prior_step_max_abs"]) == 29 and len(res["decoder_step_max_abs"]) == 12
    assert res["replica_max_abs"] < 1e-4  # the scan replica is the library's prior loop
    for k in ("text_bigG", "text_H", "image_embeddings", "decoder_latents", "images"):
        assert 0 < res["diff"][k]["max_abs"] < res["diff"][k]["ref_max_abs"]  # bf16 differs, but not wildly
    assert res["images_psnr_db"] > 20
    assert "## Precision, bf16 vs f32" in (tmp_path / "RESULTS.md").read_text()


def test_device_init_matches_the_abstract_tree():
    """The on-device random init (used on accelerators) gives every variable its shape and dtype, finite values."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import generate_benchmark as gb

    from wurst_jax.models import abstract_variables

    for name, module in gb.build_modules(gb.configs("tiny"), jnp.bfloat16).items():
        variables = gb.init_variables(module, 0, on_device=True)
        want = jax.tree_util.tree_leaves_with_path(abstract_variables(module))
        got = jax.tree_util.tree_leaves_with_path(variables)
        assert [(p, x.shape, x.dtype) for p, x in got] == [(p, x.shape, x.dtype) for p, x in want], name
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for _, x in got)


def test_generate_benchmark_sc_tiny(tmp_path):
    """Stable Cascade from random weights through its pipelines: one row with the prior / decoder figures."""
    args = ("--config", "sc-tiny", "--batch", "1", "--res", "128", "--dtype", "f32", "--steps", "2", "1")
    stdout = run_script("generate_benchmark.py", *args, "--reps", "1", "--no-warm-start", "--out-dir", str(tmp_path))
    [r] = read_jsonl(tmp_path / "results.jsonl")
    assert REQUIRED <= r.keys() and r["config"] == "sc-tiny" and r["resolution"] == 128 and r["batch"] == 1
    assert r["stage_s"]["text"] is None and r["stage_s"]["vqgan"] is None  # inside the pipeline calls
    assert r["stage_s"]["prior"] > 0 and r["stage_s"]["decoder"] > 0 and r["compile_s"] > 0
    assert r["seconds_per_batch"] == pytest.approx(r["stage_s"]["prior"] + r["stage_s"]["decoder"])
    assert r["steps"] == {"prior": 2, "prior_guidance": 4.0, "decoder": 1} and "width 12" in r["text_encoder"]
    assert r["finite"] and r["image_shape"] == [1, 128, 128, 3] and r["params"]["prior"] > 0
    assert "no StableCascadeCombinedPipeline reference" not in stdout  # --reference none: not even tried
    assert (
        "| wurst_jax | 1 |" in (tmp_path / "RESULTS.md").read_text() and "Stable Cascade (bench_cascade.py)" in stdout
    )


def test_scan_compile_times_compile_and_runs(tmp_path):
    """benchmarks/scan_compile.py at the full-width v2 prior cut to one triple, 64²: a row per mode, with `--run`
    the run time of the compiled loop on random weights."""
    out = tmp_path / "rows.jsonl"
    run_script(
        "scan_compile.py", "--stage", "prior", "--res", "64", "--prior-depth", "1", "--run", "1", "--out", str(out)
    )
    rows = read_jsonl(out)
    assert [r["mode"] for r in rows] == ["unrolled", "scan"]
    for r in rows:
        assert r["benchmark"] == "scan_compile" and r["stage"] == "prior" and r["config"] == {"depth": 1}
        assert r["compile_s"] > 0 and r["run_s"] > 0 and r["runs"] == 1
