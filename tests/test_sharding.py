"""Sharded execution on 8 fake CPU devices (and 2 real processes): every mode gives the unsharded result."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import rel_err, torch_clip, torch_decoder, torch_prior, torch_vqgan
from jax.sharding import PartitionSpec as P

import wurst_jax as wj
from wurst_jax.sharding import ShardingPlan, param_specs

MESHES = [("dp", 8, 1), ("fsdp", 8, 1), ("fsdp", 4, 2), ("tp", 4, 2), ("tp", 1, 2)]
IDS = [f"{m}-data{d}-model{k}" for m, d, k in MESHES]
TOL = 1e-5


def test_make_mesh():
    assert jax.device_count() == 8
    mesh = wj.make_mesh()
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 8, "model": 1}
    assert dict(wj.make_mesh(data=2, model=-1).shape) == {"data": 2, "model": 4}
    assert dict(wj.make_mesh(data=1, model=2, devices=jax.devices()[:2]).shape) == {"data": 1, "model": 2}
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        wj.make_mesh(data=3)
    with pytest.raises(ValueError, match=r"data=2 × model=2 = 4, but there are 8 devices"):
        wj.make_mesh(data=2, model=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        wj.make_mesh(data=-1, model=-1)


def test_partition_specs_follow_the_mode():
    module = wj.WuerstchenPrior(wj.StageCConfig.tiny())
    boxed = wj.models.abstract_variables(module, boxed=True)
    blk = lambda specs: specs["params"]["blocks_2"]["attention"]
    dp = param_specs(boxed, wj.make_mesh(), "dp")
    assert blk(dp)["to_q"]["kernel"] == P() and dp["params"]["blocks_0"]["channelwise_0"]["kernel"] == P()
    fsdp = param_specs(boxed, wj.make_mesh(), "fsdp")
    assert fsdp["params"]["blocks_0"]["channelwise_0"]["kernel"] == P(None, ("data", "model"))  # [32, 128]
    assert fsdp["params"]["blocks_0"]["channelwise_4"]["kernel"] == P(("data", "model"), None)  # [128, 32]
    assert fsdp["params"]["cond_mapper_0"]["kernel"] == P(None, ("data", "model"))  # [24, 32]: 32 divides
    assert fsdp["params"]["blocks_1"]["mapper"]["bias"] == P(("data", "model"))  # [64]
    tp = param_specs(boxed, wj.make_mesh(data=4, model=2), "tp")
    assert blk(tp)["to_q"]["kernel"] == P(None, "model") and blk(tp)["to_q"]["bias"] == P("model")
    assert blk(tp)["to_out_0"]["kernel"] == P("model", None) and blk(tp)["to_out_0"]["bias"] == P(None)
    assert tp["params"]["blocks_0"]["channelwise_0"]["kernel"] == P(None, "model")
    assert tp["params"]["blocks_0"]["channelwise_2"]["gamma"] == P(None, None, None, "model")
    assert tp["params"]["projection"]["kernel"] == P(None, None, None, None)


def _stage_cases(rng):
    x16 = rng.standard_normal((8, 6, 10, 16), np.float32)
    return {
        "prior": (
            torch_prior(seed=1),
            lambda: (x16, np.linspace(0.1, 0.9, 8, dtype=np.float32), rng.standard_normal((8, 5, 24), np.float32)),
            {},
        ),
        "decoder": (
            torch_decoder(seed=2),
            lambda: (
                rng.standard_normal((8, 32, 48, 4), np.float32),
                np.linspace(0.1, 0.9, 8, dtype=np.float32),
                rng.standard_normal((8, 6, 6, 16), np.float32),
                rng.standard_normal((8, 5, 24), np.float32),
            ),
            {},
        ),
        "vqgan-decode": (
            torch_vqgan(seed=3),
            lambda: (rng.standard_normal((8, 6, 10, 4), np.float32),),
            {"method": "decode"},
        ),
        "vqgan-encode": (
            torch_vqgan(seed=3),
            lambda: (rng.random((8, 16, 24, 3), dtype=np.float32),),
            {"method": "encode"},
        ),
        "clip": (
            torch_clip(seed=4),
            lambda: (
                rng.integers(0, 1000, (8, 77)).astype(np.int32),
                (np.arange(77)[None] < rng.integers(2, 77, (8, 1))).astype(np.int32),
            ),
            {},
        ),
    }


@pytest.fixture(scope="module")
def stage_folders(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = {}
    for name, (ref, make_inputs, kw) in _stage_cases(rng).items():
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = (folder, make_inputs(), kw)
    return out


@pytest.mark.parametrize("mode,data,model", MESHES, ids=IDS)
@pytest.mark.parametrize("stage", ["prior", "decoder", "vqgan-decode", "vqgan-encode", "clip"])
def test_every_stage_sharded_equals_unsharded(stage_folders, stage, mode, data, model):
    folder, inputs, kw = stage_folders[stage]
    module, variables = wj.load_component(folder)
    want = jax.jit(lambda v, *a: module.apply(v, *a, **kw))(variables, *inputs)
    mesh = wj.make_mesh(data=data, model=model, devices=jax.devices()[: data * model])
    module_s, variables_s = wj.load_component(folder, mesh=mesh, sharding=mode)
    leaf = variables_s["params"][next(iter(variables_s["params"]))]
    assert next(iter(jax.tree_util.tree_leaves(leaf))).sharding.mesh == mesh  # placed at load, not later
    place = ShardingPlan(mesh)
    got = jax.jit(lambda v, *a: module_s.apply(v, *a, **kw))(variables_s, *[place.batch(a) for a in inputs])
    assert data == 1 or got.sharding.spec[0] == "data"
    assert rel_err(np.asarray(got), want) < TOL


@pytest.fixture(scope="module")
def unsharded_images(tiny_checkpoints):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    pipe = wj.WuerstchenPipeline.from_pretrained(decoder_dir, prior_dir, progress=False)
    return pipe(PROMPTS, **CALL).images


PROMPTS = ["a red circle", "a blue square", "a green triangle"]  # 3 images: padded on every data axis here
CALL = dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=2, seed=11, output_type="np")


@pytest.mark.parametrize("mode,data,model", MESHES, ids=IDS)
def test_pipeline_sharded_equals_unsharded(tiny_checkpoints, unsharded_images, mode, data, model):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    mesh = wj.make_mesh(data=data, model=model, devices=jax.devices()[: data * model])
    pipe = wj.WuerstchenPipeline.from_pretrained(decoder_dir, prior_dir, mesh=mesh, sharding=mode, progress=False)
    got = pipe(PROMPTS, **CALL).images
    assert got.shape == unsharded_images.shape == (3, 128, 128, 3)
    assert np.abs(got - unsharded_images).max() < 1e-4


def test_modes_that_cannot_shard_raise(stage_folders, tmp_path):
    folder = stage_folders["prior"][0]  # tiny prior: 2 heads
    with pytest.raises(ValueError, match=r"cannot split WuerstchenPrior's attention heads \[2\]"):
        wj.load_component(folder, mesh=wj.make_mesh(data=2, model=4), sharding="tp")
    with pytest.raises(ValueError, match="sharding must be one of"):
        wj.load_component(folder, mesh=wj.make_mesh(), sharding="zero3")
    with pytest.raises(ValueError, match="needs a mesh"):
        wj.load_component(folder, sharding="fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["dp", "tp"])
def test_two_processes_agree_with_one(tiny_checkpoints, unsharded_images, tmp_path, mode):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    out, port = tmp_path / "images.npy", _free_port()
    worker = Path(__file__).with_name("multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), "2", str(port), str(decoder_dir), str(prior_dir), str(out), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert all("(3, 128, 128, 3)" in log for log in logs)
    assert np.abs(np.load(out) - unsharded_images).max() < 1e-4
