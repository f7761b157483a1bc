"""The Stable Cascade prior's image preprocessing read from the folder's feature_extractor/preprocessor_config.json
(written by transformers' CLIPImageProcessor.save_pretrained) against CLIPImageProcessor itself: non-default mean /
std, sizes, bilinear resampling, no center crop; the image embeddings end to end against transformers' vision
model; configs that cannot feed the encoder refused with the file named."""

import json

import numpy as np
import pytest
import torch
import transformers
from cascade_checkpoints import VISION
from conftest import randomize
from PIL import Image

import wurst_jax as wj
from wurst_jax.models.clip_image import preprocess
from wurst_jax.pipelines.cascade_prior import ImageEncoder, image_processor
from wurst_jax.pipelines.components import Component, read_preprocessor_config
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.sharding import ShardingPlan

SIZE = VISION["image_size"]  # 28
CONFIGS = {
    "bilinear-own-mean": dict(
        size={"shortest_edge": 33}, crop_size={"height": SIZE, "width": SIZE}, resample=2,
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
    ),
    "square-resize-no-crop": dict(
        size={"height": SIZE, "width": SIZE}, do_center_crop=False, resample=3, image_mean=[0.1, 0.2, 0.3],
        image_std=[0.9, 0.8, 0.7],
    ),
    "rescale-only": dict(size={"shortest_edge": 40}, crop_size={"height": SIZE, "width": SIZE}, do_normalize=False),
}  # fmt: skip


def images():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 53), (101, 66), (20, 31)]]
    return [*arrays, Image.fromarray(rng.integers(0, 256, (45, 61, 4), dtype=np.uint8))]


def saved(tmp_path, **kw) -> dict:
    """The config as a folder holds it: CLIPImageProcessor(**kw).save_pretrained, read back as the pipeline does."""
    proc = transformers.CLIPImageProcessor(**kw)
    assert proc.backend == "torchvision"  # what diffusers' Stable Cascade pipelines load
    proc.save_pretrained(tmp_path)
    return proc, read_preprocessor_config(tmp_path)


@pytest.mark.parametrize("name", CONFIGS)
def test_preprocessing_follows_the_folder(tmp_path, name):
    proc, raw = saved(tmp_path, **CONFIGS[name])
    config = image_processor(raw, SIZE)
    for i, image in enumerate(images()):
        got = preprocess(image, config=config)
        want = proc(image, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        assert got.shape == want.shape == (1, SIZE, SIZE, 3), (i, got.shape, want.shape)
        np.testing.assert_array_equal(got, want)  # bit-equal, as with the default config


def test_image_embeddings_end_to_end(tmp_path):
    """The prior pipeline's ImageEncoder with a non-default feature_extractor against transformers' processor +
    CLIPVisionModelWithProjection on the same weights."""
    vision = randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)), 3, 0.1)
    vision.save_pretrained(tmp_path / "image_encoder")
    proc, raw = saved(tmp_path / "feature_extractor", **CONFIGS["bilinear-own-mean"])
    encoder = ImageEncoder(
        Component(*wj.load_component(tmp_path / "image_encoder")), raw, ShardingPlan(), CompileCache()
    )
    got = encoder(images())
    with torch.no_grad():
        want = vision(pixel_values=proc(images(), return_tensors="pt").pixel_values).image_embeds.numpy()
    assert got.shape == (4, VISION["projection_dim"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(do_center_crop=False), "gives images of each input's aspect ratio"),
        (dict(crop_size={"height": 24, "width": 24}), "gives 24×24 images; the image encoder takes 28×28"),
        (dict(resample=0), "`resample` 0 is not supported; expected 2 (bilinear), 3 (bicubic)"),
        (dict(image_mean=[0.5, 0.5]), "`image_mean` must be a number or 3 numbers"),
        (dict(size={"longest_edge": 30}), "`size` {'longest_edge': 30}: expected"),
    ],
)
def test_configs_that_cannot_feed_the_encoder_are_refused(change, message):
    raw = {"size": {"shortest_edge": SIZE}, "crop_size": {"height": SIZE, "width": SIZE}, **change}
    with pytest.raises(ValueError, match="^feature_extractor/preprocessor_config.json: ") as e:
        image_processor(json.loads(json.dumps(raw)), SIZE)
    assert message in str(e.value)
