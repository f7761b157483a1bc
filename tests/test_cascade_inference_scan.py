"""Stable Cascade's inference loops can run the repeated blocks as one `lax.scan` (`StageRunner.scan_blocks`; off
by default, `runner.SCAN_BLOCKS["cascade_unet"]`: benchmarks/scan_compile.py measured scanned loops compile faster
but run slower), and a scanned stage's loop gives the latents of the unrolled blocks (a two-level tiny stage B,
random weights, f32, one step)."""

import dataclasses

import jax
import numpy as np

from wurst_jax.models import abstract_variables
from wurst_jax.models.cascade import StableCascadeUNet, StableCascadeUNetConfig
from wurst_jax.models.wuerstchen import StageBConfig, StageCConfig, WuerstchenDiffNeXt, WuerstchenPrior
from wurst_jax.pipelines import random, runner
from wurst_jax.pipelines.cascade import cascade_decoder_model
from wurst_jax.pipelines.components import Component
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.samplers import DDPMWuerstchen
from wurst_jax.sharding import ShardingPlan


def stage(module, variables=None, scan_blocks=None) -> runner.StageRunner:
    streams = (random.Stream.DECODER_LATENTS, random.Stream.DECODER_STEPS)
    parts = (DDPMWuerstchen(), ShardingPlan(), CompileCache(), streams)
    component = Component(module, variables if variables is not None else {})
    return runner.StageRunner("decoder", component, cascade_decoder_model, *parts, scan_blocks=scan_blocks)


def test_defaults_per_model_kind():
    """Unrolled by default (scanned loops ran 1.25–2.1× as long, RESULTS.md); scanning is an option per runner."""
    for cfg in (StableCascadeUNetConfig.tiny_prior(), StableCascadeUNetConfig.tiny_decoder()):
        assert not stage(StableCascadeUNet(cfg)).module.scan_blocks
        run = stage(StableCascadeUNet(cfg), scan_blocks=True)
        assert run.scan_blocks and run.module.scan_blocks and not run.component.module.scan_blocks
    assert not stage(WuerstchenPrior(StageCConfig.tiny())).scan_blocks
    assert not stage(WuerstchenDiffNeXt(StageBConfig.tiny())).scan_blocks


def test_stage_b_loop_scanned_equals_unrolled():
    kinds = StableCascadeUNetConfig.tiny_decoder().block_types_per_layer[:2]
    cfg = dataclasses.replace(  # tiny_decoder's first two levels: a repeat mapper, repeats to scan; fast to compile
        StableCascadeUNetConfig.tiny_decoder(),
        block_out_channels=(8, 16),
        num_attention_heads=(0, 2),
        down_num_layers_per_block=(1, 2),
        up_num_layers_per_block=(2, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(2, 1),
        block_types_per_layer=kinds,
        dropout=(0.0, 0.1),
    )
    module = StableCascadeUNet(cfg)
    assert max(cfg.down_num_layers_per_block) >= 2  # repeats for the scan to share
    leaves, tree = jax.tree_util.tree_flatten(abstract_variables(module))
    rng = np.random.default_rng(0)  # numpy: jax.random would compile a kernel per leaf shape
    variables = tree.unflatten([jax.device_put(0.2 * rng.standard_normal(x.shape, np.float32)) for x in leaves])
    run = stage(module, variables=variables, scan_blocks=True)
    b, h = 2, 3
    cond = {"effnet": rng.standard_normal((b, h, h, cfg.effnet_in_channels), np.float32)}
    cond["pooled"] = rng.standard_normal((b, 1, cfg.clip_text_pooled_in_channels), np.float32)
    args = (b, (16, 16, cfg.in_channels), np.array([1.0, 0.5]), cond, None, 0.0, 5)  # one step: one compile each
    scanned = np.asarray(run(*args))
    run.scan_blocks = False
    unrolled = np.asarray(run(*args))
    assert scanned.shape == (b, 16, 16, cfg.in_channels) and np.abs(scanned[0] - scanned[1]).max() > 1e-3
    np.testing.assert_allclose(scanned, unrolled, atol=1e-4 * np.abs(unrolled).max(), rtol=0)
