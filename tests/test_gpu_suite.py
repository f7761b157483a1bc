"""benchmarks/gpu_suite.py in its short mode on CPU: it runs end to end, writes its rows in the documented order with
the documented keys, keeps its compilation cache under the output folder, and its on-device random init matches the
abstract variables. Times are checked for sign only, never for speed."""

import datetime
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

COMMON = {"date", "versions", "config", "resolution", "implementation", "batch", "dtype"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--short", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, p.stdout


def test_rows_in_order(suite):
    _, rows, stdout = suite
    order = [(r["implementation"], r["batch"], r.get("row")) for r in rows]
    assert order == [
        ("wurst_jax", 1, "cold"),
        ("wurst_jax", 1, "steady"),
        ("wurst_jax", 1, "pipeline_first_call"),
        ("wurst_jax", 1, "warm_start"),
        ("wurst_jax", 4, "cold"),
        ("wurst_jax", 4, "steady"),
        ("diffusers-eager", 1, "steady"),
        ("diffusers-eager", 4, "steady"),
    ]
    for r in rows:
        assert COMMON <= r.keys() and r["config"] == "tiny" and r["resolution"] == 128
        datetime.datetime.strptime(r["date"], "%Y-%m-%dT%H:%M:%SZ")
        assert r["versions"]["jax"] == jax.__version__ and r["versions"]["flax"]
        assert json.dumps(r) in stdout  # printed as written


def test_jax_rows(suite):
    _, rows, _ = suite
    jax_rows = {(r["batch"], r["row"]): r for r in rows if r["implementation"] == "wurst_jax"}
    for r in jax_rows.values():
        assert r["device"] == "cpu" and "failed" not in r
        assert r["startup_s"] > 0 and r["init_s"] > 0
    for batch in (1, 4):
        cold, steady = jax_rows[batch, "cold"], jax_rows[batch, "steady"]
        assert cold["compile_s"] > 0 and cold["first_images_s"] > cold["compile_s"] and cold["finite"]
        assert set(cold["compile_stage_s"]) == {"text_prior", "text_decoder", "prior", "decoder", "vqgan"}
        assert steady["seconds_per_batch"] == pytest.approx(sum(steady["stage_s"].values()))
        assert steady["img_per_s"] == pytest.approx(batch / steady["seconds_per_batch"])
        assert steady["s_per_image"] == pytest.approx(steady["seconds_per_batch"] / batch)
        assert "peak_mem_bytes" in steady and steady["peak_host_rss_bytes"] > 0
    warm = jax_rows[1, "warm_start"]
    assert warm["finite"] and warm["warm_start_s"] > warm["init_s"]


def test_reference_rows_say_why(suite):
    _, rows, _ = suite
    refs = [r for r in rows if r["implementation"] == "diffusers-eager"]
    assert all("full-size v2" in r["skipped"] for r in refs)


def test_cache_under_out(suite):
    out, _, _ = suite
    assert any((out / "jax_cache").iterdir())  # the warm process read what the first one wrote here


def test_fast_init_on_device():
    """The GPU path of the random init (one normal per leaf, jitted per shape): the abstract tree's shapes and
    dtypes, kernels scaled by 1/sqrt(fan_in), scales around 1, distinct leaves of one shape differ."""
    import gpu_suite
    import jax.numpy as jnp

    import wurst_jax as wj
    from wurst_jax.models import abstract_variables

    module = wj.PaellaVQModel(wj.StageAConfig.tiny(), jnp.float32, jnp.float32)
    var = gpu_suite.fast_init(module, 0, on_device=True)
    want = abstract_variables(module)
    assert jax.tree_util.tree_structure(var) == jax.tree_util.tree_structure(want)
    for got, ref in zip(jax.tree_util.tree_leaves(var), jax.tree_util.tree_leaves(want), strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype
    flat = jax.tree_util.tree_leaves_with_path(var)
    kernels = [np.asarray(x) for p, x in flat if p[-1].key == "kernel" and x.size > 2000]
    for k in kernels:
        assert np.std(k) * np.sqrt(np.prod(k.shape[:-1])) == pytest.approx(1.0, rel=0.15)
    scales = [np.asarray(x) for p, x in flat if p[-1].key == "scale"]
    assert scales and all(abs(s.mean() - 1) < 0.1 for s in scales)
    same = {}
    for _, x in flat:
        same.setdefault((x.shape, x.dtype), []).append(np.asarray(x))
    assert any(len(v) > 1 and not np.array_equal(v[0], v[1]) for v in same.values())
