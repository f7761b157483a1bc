"""The inference loops can run the repeated blocks as one `lax.scan` (`StageRunner.scan_blocks`, off by default:
the prior's triples and the decoder's level repeats): images equal those of the unrolled blocks, at the tiny config."""

import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.pipelines import runner


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    return wj.WuerstchenPipeline.from_pretrained(decoder=decoder_dir, prior=prior_dir, progress=False)


def runners(pipe):
    return pipe.prior_pipe.runner, pipe.decoder_pipe.runner


def test_scan_is_an_option_and_equals_unrolled(pipe):
    prior, decoder = runners(pipe)
    assert not prior.scan_blocks and not prior.module.scan_blocks  # the default: unrolled (runs faster)
    assert not decoder.scan_blocks and not decoder.module.scan_blocks
    prior.scan_blocks = decoder.scan_blocks = True
    assert prior.module.scan_blocks and decoder.module.scan_blocks and not prior.component.module.scan_blocks
    assert pipe.prior_pipe.prior.module.config.depth >= 2  # more than one triple: the scan has work to share
    assert max(pipe.decoder_pipe.decoder.module.config.blocks) >= 2
    kw = dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=2, output_type="np", seed=3)
    scanned = pipe(["a red circle", "a green square"], **kw).images
    for r in runners(pipe):
        r.scan_blocks = False
    try:
        unrolled = pipe(["a red circle", "a green square"], **kw).images
    finally:
        prior.scan_blocks, decoder.scan_blocks = runner.SCAN_BLOCKS["prior"], runner.SCAN_BLOCKS["decoder"]
    assert scanned.shape == (2, 128, 128, 3) and np.abs(scanned - scanned[::-1]).max() > 1e-3
    np.testing.assert_allclose(scanned, unrolled, atol=1e-4, rtol=0)  # f32 summation order: 2.5e-5 seen
