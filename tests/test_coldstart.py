"""Cold start: `CompileCache.planning` (a dry run lowers every stage program and compiles them side by side, as
`wurst-jax generate` does on its first batch) gives the images of the sequential path bit for bit."""

from concurrent.futures import Future

import numpy as np

import wurst_jax as wj

CALL = dict(
    prompt="a red circle",
    height=128,
    width=128,
    prior_num_inference_steps=2,
    num_inference_steps=2,
    prior_guidance_scale=4.0,
    decoder_guidance_scale=2.0,
    seed=7,
    output_type="np",
)


def test_planned_compiles_give_the_sequential_images(tiny_checkpoints):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    load = lambda: wj.WuerstchenPipeline.from_pretrained(decoder=decoder_dir, prior=prior_dir, progress=False)  # noqa: E731
    sequential = load()(**CALL).images
    pipe = load()
    compiler = pipe.prior_pipe.compiler
    with compiler.planning():
        dry = pipe(**CALL).images
    # every stage (text encoder, prior, decoder, VQGAN) is compiling in the pool; nothing has run
    assert {k[0] for k, v in compiler._executables.items() if isinstance(v, Future)} >= {"prior", "decoder", "vqgan"}
    assert not np.any(dry)
    planned = pipe(**CALL).images
    assert not any(isinstance(v, Future) for v in compiler._executables.values())  # the real call used them all
    np.testing.assert_array_equal(planned, sequential)
    assert np.ptp(planned) > 0
