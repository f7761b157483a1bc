"""Real signals to a real `wurst-jax convert --overwrite` subprocess at several points (early, mid-way, during the
orbax save): an interrupted run exits 130 / 143, leaves the old DST untouched and no `.DST.partial-*` folder; a
killed run's partial folder is removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wurst_jax.serving.backend import TINY_MODEL

SRC = TINY_MODEL / "wuerstchen"


def _start(dst: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "wurst_jax.cli", "convert", str(SRC), str(dst), "--overwrite"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _partials(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.partial-*"))


def _wait_for(cond, timeout: float = 180.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize(
    "when, sig",
    [
        ("partial folder created", signal.SIGINT),
        ("during the orbax save", signal.SIGINT),
        ("during the orbax save", signal.SIGTERM),
    ],
)
def test_signal_never_replaces_dst_and_leaves_nothing(tmp_path, when, sig):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    proc = _start(dst)
    if when == "partial folder created":
        assert _wait_for(lambda: _partials(dst))
    else:  # orbax writes its checkpoint under a temporary name first
        assert _wait_for(lambda: any("orbax" in str(p) for q in _partials(dst) for p in q.rglob("*")))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 or when != "partial folder created"  # seconds of work remain at that point
    if proc.returncode == 0:  # finished before the signal arrived: then DST is the new, complete one
        assert (dst / "wurst_jax_manifest.json").is_file() or any(dst.iterdir())
    else:
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert "interrupted" in err.strip().splitlines()[-1]
        assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]  # DST untouched
    assert not _partials(dst)
    assert not list(tmp_path.glob(".dst.old-*"))


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path):
    dst = tmp_path / "dst"
    proc = _start(dst)
    assert _wait_for(lambda: any("orbax" in str(p) for q in _partials(dst) for p in q.rglob("*")))
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=60)
    left = _partials(dst)
    assert left and not dst.exists()
    proc = _start(dst)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"removed {left[0]}, left by an interrupted run" in err
    assert not _partials(dst) and dst.is_dir()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, capsys, damage):
    """The newest checkpoint's array files truncated or deleted: one line names it, the previous step restores."""
    import jax.numpy as jnp
    import numpy as np

    from wurst_jax.train.state import Checkpoints, TrainState

    def state(k: int) -> TrainState:
        p = {"w": jnp.full((64, 64), float(k))}
        return TrainState(jnp.asarray(k), p, {"m": p["w"] * 2}, p, {}, jnp.zeros((2,), jnp.uint32))

    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(state(1))
    ckpts.save(state(2))
    files = [p for p in (tmp_path / "ckpt" / "2").rglob("*") if p.is_file() and "_METADATA" not in p.name]
    data = [p for p in files if "d" in p.parts or "ocdbt" in str(p)] or files
    for p in data:
        if damage == "delete":
            p.unlink()
        else:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    restored = Checkpoints(tmp_path / "ckpt").restore(state(0))
    assert int(restored.step) == 1
    np.testing.assert_array_equal(restored.params["w"], np.ones((64, 64)))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("checkpoint step")]
    assert len(lines) == 1 and "checkpoint step 2 in" in lines[0] and "skipping it" in lines[0]


def test_abandoned_reads_after_a_failed_restore_are_quiet(monkeypatch):
    """tensorstore's late reports of the failed restore's reads ("Event loop is closed", through
    sys.unraisablehook, seen in 2 of 10 runs) are dropped; any other unraisable exception still reaches the hook."""
    import sys
    import types

    from wurst_jax.train.state import quiet_abandoned_reads

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    quiet_abandoned_reads()
    hook = sys.unraisablehook
    quiet_abandoned_reads()  # once is enough: not wrapped twice
    assert sys.unraisablehook is hook
    report = lambda e: types.SimpleNamespace(exc_value=e, object=None)  # noqa: E731
    sys.unraisablehook(report(RuntimeError("Event loop is closed")))
    other = report(RuntimeError("something else"))
    sys.unraisablehook(other)
    assert seen == [other]
