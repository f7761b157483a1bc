"""Real signals to a real `wurst-jax` subprocess at chosen points: right after start; while jax imports, the
KeyboardInterrupt swallowed in a GC callback (as XLA's callback swallows it); while orbax's save builds its asyncio
event loop; inside `prepare-data`: swallowed before the first shard, SIGTERM from an image-decoding worker thread, and
with the encoder's XLA computation in flight. Each run must end with one `interrupted` line, exit 130 (143 for
SIGTERM), no traceback, nothing on disk.

The subprocess runs `DRIVER`, which sends the signal to its own process (`os.kill`) at the point, so each point is
hit on every run, however loaded the machine; what happens next is the real signal handling of `wurst_jax.cli.run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wurst_jax.serving.backend import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import gc, importlib, importlib.abc, json, os, signal, sys, threading
point, sig, argv = sys.argv[1].split(":"), getattr(signal, sys.argv[2]), json.loads(sys.argv[3])

def fire(how):
    if how == "eaten":  # raised inside a GC callback, where Python prints and drops it (as in XLA's)
        def callback(phase, info):
            gc.callbacks.remove(callback)
            os.kill(os.getpid(), sig)
            sum(range(1000))  # the handler runs here, inside the callback
        gc.callbacks.append(callback)
        gc.collect()
    else:
        os.kill(os.getpid(), sig)

from wurst_jax import cli, output_dir
kind = point[0]
if kind == "start":  # the first moment the entry point can see a signal
    record = output_dir.record_signals
    output_dir.record_signals = lambda: (record(), fire("raise"))
elif kind == "import":  # when the import system is asked for the module
    name, how = point[1:]
    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == name:
                sys.meta_path.remove(self)
                fire(how)
    sys.meta_path.insert(0, Hook())
elif kind == "dispatch":  # right after the encoder's computation is dispatched, before its result is awaited
    import jax
    jit = jax.jit
    def patched_jit(fun, **kwargs):
        compiled = jit(fun, **kwargs)
        if "in_shardings" not in kwargs:  # only prepare-data's encoder
            return compiled
        def call(*args):
            out = compiled(*args)
            fire("raise")
            return out
        return call
    jax.jit = patched_jit
elif kind == "call":  # at the nth call of module.attr (a dotted attribute path), in the calling thread
    module, attr, nth, how = point[1:]
    *path, name = attr.split(".")
    owner = importlib.import_module(module)
    for p in path:
        owner = getattr(owner, p)
    original, calls = getattr(owner, name), []
    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(nth):
            fire(how)
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)
sys.argv = ["wurst-jax", *argv]
cli.run()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny EfficientNet folder (random weights) and 24 captioned images: prepare-data runs in about a second."""
    import jax

    import wurst_jax as wj
    from wurst_jax.weights import export_component

    root = tmp_path_factory.mktemp("interrupt_points")
    module = wj.EfficientNetEncoder(wj.EfficientNetConfig(c_latent=16, c_cond=48, effnet="tiny"))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)  # positive values (BatchNorm variances among them): no init to run
    export_component(
        module, jax.tree.map(lambda s: rng.uniform(0.1, 0.5, s.shape).astype(s.dtype), shapes), root / "effnet"
    )
    (root / "images").mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(f"image {i}")
    return root


CONVERT = ("convert", str(TINY_MODEL / "wuerstchen" / "decoder"))
PREPARE = ("prepare-data", "images", "--effnet", "effnet", "--resolution", "32", "--shard-size", "8",
           "--batch-size", "4", "--quiet")  # fmt: skip

# (point, signal, command); the point's grammar is DRIVER's
POINTS = [
    ("start", "SIGINT", CONVERT),
    ("import:jax:eaten", "SIGINT", CONVERT),  # before: swallowed, the run went on and wrote DST (exit 0)
    # while orbax builds an asyncio loop: before, the half-built loop's __del__ printed a traceback (CI, stop 24)
    ("call:socket:socketpair:1:raise", "SIGINT", CONVERT),
    ("call:wurst_jax.train.prepare:load_image:3:raise", "SIGTERM", PREPARE),  # from a decoding worker thread
    ("dispatch", "SIGINT", PREPARE),  # the encoder's result still computing
    ("call:wurst_jax.train.prepare:make_encoder:1:eaten", "SIGINT", PREPARE),  # swallowed: seen at the next shard
]


@pytest.mark.parametrize("point, sig, command", POINTS, ids=[p[0].split(":raise")[0] for p in POINTS])
def test_signal_at_a_point_ends_in_one_line_and_leaves_nothing(data, tmp_path, point, sig, command):
    src, *rest = command[1:]
    argv = [command[0], src if src.startswith("/") else str(data / src), str(tmp_path / "out")]
    argv += [str(data / a) if a == "effnet" else a for a in rest]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, point, sig, json.dumps(argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], res.stderr
    assert len(lines) == 1 and lines[0].startswith(f"wurst-jax {command[0]}: interrupted"), res.stderr
    assert "Traceback" not in res.stderr and not res.stdout
    assert not list(tmp_path.iterdir())  # no OUT, no .out.partial-*
