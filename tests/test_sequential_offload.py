"""Sequential offload (`Component(offload="sequential")`): the prior's and the decoder's parameters stay in host
memory and the loop moves one block repeat's to the device per scan step; the latents equal those of the resident
run (unrolled: to f32 summation order; scanned: to 1e-6)."""

import dataclasses

import jax
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.models import abstract_variables
from wurst_jax.pipelines import random
from wurst_jax.pipelines.components import Component
from wurst_jax.pipelines.runner import StageRunner
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.pipelines.wuerstchen import decoder_model, prior_model
from wurst_jax.samplers import DDPMWuerstchen
from wurst_jax.sharding import ShardingPlan

CFG = wj.StageCConfig(c_in=16, c=32, c_cond=24, c_r=8, depth=3, nhead=2, dropout=0.0)
DECODER = dataclasses.replace(wj.StageBConfig.tiny(), blocks=(1, 3, 2, 1))  # level 1: 3 repeats down, 2 up


def module(stage):
    return wj.WuerstchenPrior(CFG) if stage == "prior" else wj.WuerstchenDiffNeXt(DECODER)


def variables(module):
    """Random leaves (none zero: every triple contributes); the output head small, so the prior's (x - a) / |1 - b|
    stays away from its pole and the comparison measures the blocks, not an amplified rounding."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables(module))
    rng = np.random.default_rng(0)
    scale = lambda path: 0.01 if any(h in jax.tree_util.keystr(path) for h in ("out_1", "clf_1")) else 0.1  # noqa: E731
    return treedef.unflatten([jax.numpy.asarray(scale(p) * rng.standard_normal(x.shape), x.dtype) for p, x in leaves])


def run(stage, component, scan_blocks=False):
    rng = np.random.default_rng(1)
    if stage == "prior":
        streams, fn, shape = (random.Stream.PRIOR_LATENTS, random.Stream.PRIOR_STEPS), prior_model, (4, 5, 16)
        cond, uncond = ({"clip": rng.standard_normal((2, 6, CFG.c_cond), np.float32)} for _ in range(2))
    else:
        streams, fn, shape = (random.Stream.DECODER_LATENTS, random.Stream.DECODER_STEPS), decoder_model, (16, 32, 4)
        cond = {"effnet": rng.standard_normal((2, 6, 6, 16), np.float32)}
        cond["clip"], uncond = rng.standard_normal((2, 5, DECODER.clip_embd), np.float32), None
    runner = StageRunner(stage, component, fn, DDPMWuerstchen(), ShardingPlan(), CompileCache(), streams)
    runner.scan_blocks = scan_blocks
    out = runner(2, shape, np.linspace(1.0, 0.0, 4), cond, uncond, guidance=4.0, seed=[3, 4])
    return runner, np.asarray(out)


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_sequential_equals_resident(stage):
    mod = module(stage)
    var = variables(mod)
    _, want = run(stage, Component(mod, var), scan_blocks=True)  # the same program but for where weights live
    seq = Component(mod, var, offload="sequential")
    assert seq.streams
    kinds = {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(seq.variables)}
    assert kinds <= {"pinned_host", "unpinned_host"}, kinds
    runner, got = run(stage, seq)
    names = runner.module.streamed_names()
    assert runner.module.stream_blocks and len(names) == (9 if stage == "prior" else 32)  # decoder: 20 down, 12 up
    assert np.abs(want).max() > 0.1 and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max(), rtol=0)
    if stage == "prior":  # and the unrolled default path (the decoder's scanned == unrolled: test_inference_scan.py)
        _, unrolled = run(stage, Component(mod, var))  # f32 summation order: 1.2e-5 of values ~1 seen (CFG 4)
        np.testing.assert_allclose(got, unrolled, atol=5e-5 * np.abs(want).max(), rtol=0)
    leaves = jax.tree_util.tree_leaves(seq.variables)  # still in host memory, not consumed by the run
    assert {x.sharding.memory_kind for x in leaves} <= {"pinned_host", "unpinned_host"}
    assert not any(x.is_deleted() for x in leaves)


def test_bad_offload_value():
    mod = module("prior")
    with pytest.raises(ValueError, match="offload='layers'"):
        Component(mod, variables(mod), offload="layers")
