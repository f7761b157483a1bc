"""Sequential offload (`Component(offload="sequential")`): the prior's parameters stay in host memory and the loop
moves one block triple's to the device per scan step; the latents equal those of the resident, unrolled run."""

import jax
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.models import abstract_variables
from wurst_jax.pipelines import random
from wurst_jax.pipelines.components import Component
from wurst_jax.pipelines.runner import StageRunner
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.pipelines.wuerstchen import prior_model
from wurst_jax.samplers import DDPMWuerstchen
from wurst_jax.sharding import ShardingPlan

CFG = wj.StageCConfig(c_in=16, c=32, c_cond=24, c_r=8, depth=3, nhead=2, dropout=0.0)


def variables(module):
    """Random leaves (none zero: every triple contributes); the output head small, so the prior's (x - a) / |1 - b|
    stays away from its pole and the comparison measures the blocks, not an amplified rounding."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_variables(module))
    rng = np.random.default_rng(0)
    scale = lambda path: 0.01 if "out_1" in jax.tree_util.keystr(path) else 0.1  # noqa: E731
    return treedef.unflatten([jax.numpy.asarray(scale(p) * rng.standard_normal(x.shape), x.dtype) for p, x in leaves])


def run(component, scan_blocks=False):
    streams = (random.Stream.PRIOR_LATENTS, random.Stream.PRIOR_STEPS)
    runner = StageRunner("prior", component, prior_model, DDPMWuerstchen(), ShardingPlan(), CompileCache(), streams)
    runner.scan_blocks = scan_blocks
    rng = np.random.default_rng(1)
    cond, uncond = ({"clip": rng.standard_normal((2, 6, CFG.c_cond), np.float32)} for _ in range(2))
    out = runner(2, (4, 5, CFG.c_in), np.linspace(1.0, 0.0, 4), cond, uncond, guidance=4.0, seed=[3, 4])
    return runner, np.asarray(out)


def test_sequential_equals_resident():
    module = wj.WuerstchenPrior(CFG)
    var = variables(module)
    _, want = run(Component(module, var))
    seq = Component(module, var, offload="sequential")
    assert seq.streams
    kinds = {x.sharding.memory_kind for x in jax.tree_util.tree_leaves(seq.variables)}
    assert kinds <= {"pinned_host", "unpinned_host"}, kinds
    runner, got = run(seq)
    assert runner.module.stream_blocks and len(runner.module.streamed_names()) == 3 * CFG.depth
    assert np.abs(want).max() > 0.1 and np.isfinite(got).all()
    # against the unrolled blocks: f32 summation order (1.2e-5 of values ~1 seen, CFG 4 amplifies)
    np.testing.assert_allclose(got, want, atol=5e-5 * np.abs(want).max(), rtol=0)
    _, scanned = run(Component(module, var), scan_blocks=True)  # the same program but for where weights live
    np.testing.assert_allclose(got, scanned, atol=1e-6 * np.abs(want).max(), rtol=0)
    leaves = jax.tree_util.tree_leaves(seq.variables)  # still in host memory, not consumed by the run
    assert {x.sharding.memory_kind for x in leaves} <= {"pinned_host", "unpinned_host"}
    assert not any(x.is_deleted() for x in leaves)


def test_bad_offload_value():
    module = wj.WuerstchenPrior(CFG)
    with pytest.raises(ValueError, match="offload='layers'"):
        Component(module, variables(module), offload="layers")
