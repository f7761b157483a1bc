"""Image-to-image on the Würstchen v2 prior pipeline (tiny checkpoints, a tiny random EfficientNet encoder)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.models.effnet import encode

SIZE = 128  # → a 3×3 prior grid, the image seen at 96² by the encoder


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    _, prior_dir, _ = tiny_checkpoints
    pipe = wj.WuerstchenPriorPipeline.from_pretrained(prior_dir, progress=False)
    module = wj.EfficientNetEncoder(dataclasses.replace(wj.EfficientNetConfig.tiny(), c_latent=16))
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))
    variables = {k: wj_unbox(v) for k, v in variables.items()}
    pipe.load_effnet((module, variables))
    return pipe


def wj_unbox(tree):
    from flax import linen as nn

    return nn.meta.unbox(tree)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.random((2, SIZE, SIZE, 3)).astype(np.float32)


def run(pipe, prompt="a cat", **kw):
    opts = dict(height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=1.0, seed=3)
    return pipe(prompt, **{**opts, **kw}).image_embeddings


def test_strength_one_is_text_to_image(pipe, images):
    np.testing.assert_array_equal(run(pipe, image=images[0], strength=1.0), run(pipe))


def test_small_strength_returns_the_encoding_and_distance_grows(pipe, images):
    eff = pipe.effnet
    want = np.asarray(encode(eff.module, eff.variables, images[:1], (96, 96)))
    dist = [np.abs(run(pipe, image=images[0], strength=s) - want).mean() for s in (1e-4, 0.3, 0.6, 1.0)]
    assert dist[0] < 1e-2 * dist[-1], dist  # ≈ the encoding (text-to-image lands far from it)
    assert dist == sorted(dist), dist


def test_batches_of_prompts_and_images(pipe, images):
    one = run(pipe, ["a cat", "a dog"], image=images[0], strength=0.5)
    assert one.shape == (2, 3, 3, 16)
    many = run(pipe, "a cat", image=list(images), strength=0.5)
    assert many.shape == (2, 3, 3, 16)
    assert not np.allclose(many[0], many[1])  # image 0 and image 1 start apart and end apart
    with pytest.raises(ValueError, match="strength"):
        run(pipe, strength=0.5)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        run(pipe, ["a", "b"], image=[images[0]] * 3, strength=0.5)
