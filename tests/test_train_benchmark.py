"""The train-step benchmark script at its small config on CPU: one device and an 8-device FSDP mesh give the
documented record (and the same loss), and the full-size v2 train state checks out through `jax.eval_shape`.
Times are only checked for being finite and positive, never for speed."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_benchmark as tb  # noqa: E402

from wurst_jax.models import WuerstchenPrior, param_count  # noqa: E402

SMALL = ("--config", "small", "--steps", "2", "--warmup", "1")


def check_record(rec: dict, n_devices: int) -> None:
    assert set(tb.KEYS) <= rec.keys()
    assert rec["implementation"] == "wurst_jax" and rec["benchmark"] == "train_step_stage_c"
    assert rec["config"] == "small" and rec["batch"] == 8 and rec["n_devices"] == n_devices
    assert rec["latent_shape"] == [8, 6, 6, 16] and rec["text_shape"] == [8, 77, 64]
    assert math.isfinite(rec["samples_per_s"]) and rec["samples_per_s"] > 0
    assert rec["seconds_per_step"] > 0 and rec["compile_s"] > 0
    assert rec["flops_per_step"] > 0 and rec["flops_per_device_step"] > 0
    assert rec["mfu"] is None and rec["peak_mem_bytes"] is None  # no known peak, no allocator stats on a CPU
    assert rec["params"] == param_count(WuerstchenPrior(tb.stage_c_config("small")))
    assert rec["final_step"] == 3 and rec["loss_finite"]
    assert set(rec["versions"]) >= {"jax", "flax", "optax"}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    rec = tb.main([*SMALL, "--devices", "1", "--no-write", "--out-dir", str(out)])
    assert list(out.iterdir()) == []  # --no-write: nothing written
    return rec


def test_small_one_device(one_device):
    check_record(one_device, 1)
    assert one_device["sharding"] is None
    assert one_device["state_bytes_per_device"] == one_device["state_bytes"]


def test_small_fsdp_on_8_devices(one_device, tmp_path):
    rec = tb.main([*SMALL, "--sharding", "fsdp", "--out-dir", str(tmp_path)])
    check_record(rec, 8)
    assert rec["sharding"] == "fsdp"
    assert rec["state_bytes_per_device"] < rec["state_bytes"] / 4  # params, moments and EMA split
    assert rec["flops_per_device_step"] < rec["flops_per_step"]
    assert rec["final_loss"] == pytest.approx(one_device["final_loss"], rel=1e-3)  # sharded == unsharded
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["benchmark"] == "train_step_stage_c" and rows[0]["sharding"] == "fsdp"
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Train step, Stage C · " in md and "| small | unrolled | fsdp | 8 | 8 | 8×6×6×16 |" in md


def test_v2_state_through_eval_shape():
    """Full size, shapes only: the released prior's parameter count and an FSDP-split train state."""
    rec = tb.main(["--config", "v2", "--dry-run", "--sharding", "fsdp"])
    assert rec["params"] == 993_636_896
    assert rec["latent_shape"] == [8, 24, 24, 16] and rec["text_shape"] == [8, 77, 1280]
    assert 4 * 4 * rec["params"] <= rec["state_bytes"] < 4 * 4 * rec["params"] + 2**20  # f32 params, μ, ν, EMA
    assert rec["n_devices"] == 8 and rec["state_bytes_per_device"] < rec["state_bytes"] / 7


def test_several_batch_sizes_share_one_state(tmp_path):
    recs = tb.main([*SMALL, "--devices", "1", "--batch", "8", "4", "--out-dir", str(tmp_path)])
    assert [r["batch"] for r in recs] == [8, 4]
    assert recs[0]["state_init_s"] > 0 and recs[1]["state_init_s"] is None  # made once, then reused
    assert recs[1]["final_step"] == 6 and recs[1]["latent_shape"] == [4, 6, 6, 16]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [8, 4]
    assert (tmp_path / "RESULTS.md").read_text().count("## Train step, Stage C · ") == 2


def test_scanned_rematerialised_blocks_count_the_same_model_flops(one_device, tmp_path):
    """Scan and remat change the program, not the model FLOPs the MFU divides (XLA counts a loop body once)."""
    rec = tb.main([*SMALL, "--devices", "1", "--scan-blocks", "--remat", "--out-dir", str(tmp_path)])
    check_record(rec, 1)
    assert rec["scan_blocks"] and rec["remat"] and rec["xla_flops_per_device_step"] is None
    assert rec["flops_per_step"] == one_device["flops_per_step"]
    assert one_device["xla_flops_per_device_step"] > 0 and not one_device["scan_blocks"]
    assert "| small | scan+remat | none | 1 | 8 | 8×6×6×16 |" in (tmp_path / "RESULTS.md").read_text()


def test_compile_only_allocates_nothing_and_records_xla_buffers(tmp_path):
    rec = tb.main([*SMALL, "--devices", "1", "--compile-only", "--out-dir", str(tmp_path)])
    assert rec["compile_only"] and rec["compile_s"] > 0 and rec["state_init_s"] is None
    assert rec["seconds_per_step"] is None and rec["samples_per_s"] is None and rec["final_loss"] is None
    assert rec["flops_per_step"] > 0 and rec["xla_temp_bytes"] > 0 and rec["xla_argument_bytes"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| small | unrolled | none | 1 | 8 | 8×6×6×16 | – | – |" in md and "compiled only" in md


def test_flax_init_gives_the_same_state_layout(tmp_path):
    """`--init flax` (module.init in one jit) and the default per-shape normal draws make the same state."""
    import jax

    recs = []
    for init in ("flax", "normal"):
        a = tb.parse_args([*SMALL, "--devices", "1", "--init", init])
        b = tb.build(a)
        state = tb.make_state(b, init)
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(b["abstract"])
        assert all(
            x.shape == y.shape and x.dtype == y.dtype
            for x, y in zip(*map(jax.tree_util.tree_leaves, (state, b["abstract"])), strict=True)
        )
        recs.append(state)
    normal = jax.tree_util.tree_leaves(recs[1].params)
    assert all(0 < float(x.std()) < 0.03 for x in normal if x.size > 100)  # N(0, 0.02²), no zero-initialised leaf


def test_out_of_memory_is_a_row_and_stops_the_sizes(tmp_path, monkeypatch):
    """A batch size that does not fit is written as such; the smaller ones before it keep their figures."""
    real = tb.benchmark

    def fake(a, state=None):
        if a.batch > 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.\nmore")
        return real(a, state)

    monkeypatch.setattr(tb, "benchmark", fake)
    recs = tb.main([*SMALL, "--devices", "1", "--batch", "4", "8", "16", "--out-dir", str(tmp_path)])
    assert [r["batch"] for r in recs] == [4, 8] and recs[0]["samples_per_s"] > 0
    assert recs[1]["out_of_memory"] and recs[1]["error"].startswith("RESOURCE_EXHAUSTED: Out of memory")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [4, 8]
    assert "batch 8 (unrolled): **out of device memory**" in (tmp_path / "RESULTS.md").read_text()
    monkeypatch.setattr(tb, "benchmark", lambda a, state=None: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # anything else still fails the run
        tb.main([*SMALL, "--devices", "1", "--no-write"])


def test_stage_b_small_trains_and_scan_remat_counts_the_same_flops(tmp_path):
    from wurst_jax.models import WuerstchenDiffNeXt

    # 128²: the decoder's latent is 32² (its compute on this CPU is 1/16 of the default 256²'s attention)
    args = ["--stage", "b", *SMALL, "--res", "128", "--devices", "1", "--out-dir", str(tmp_path)]
    plain = tb.main(args)
    assert plain["benchmark"] == "train_step_stage_b" and plain["stage"] == "b" and plain["loss_finite"]
    assert plain["latent_shape"] == [8, 32, 32, 4] and plain["text_shape"] == [8, 77, 32]
    assert plain["params"] == param_count(WuerstchenDiffNeXt(tb.stage_b_config("small")))
    assert plain["final_step"] == 3 and plain["samples_per_s"] > 0 and plain["flops_per_step"] > 0
    scanned = tb.main([*args, "--scan-blocks", "--remat", "--compile-only"])
    assert scanned["flops_per_step"] == plain["flops_per_step"] and scanned["xla_temp_bytes"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.count("## Train step, Stage B · ") == 2 and "| small | scan+remat | none | 1 | 8 | 8×32×32×4 |" in md
