"""Stable Cascade's CLIP encoders against transformers: text and vision towers with projection, image preprocessing.

Tiny random checkpoints written with `save_pretrained` and converted with the project's converter; full-size
parameter counts through `jax.eval_shape` against transformers on the meta device.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import randomize, rel_err
from PIL import Image
from safetensors.numpy import load_file

from wurst_jax.models import clip_text, clip_vision
from wurst_jax.models.clip_image import preprocess
from wurst_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from wurst_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from wurst_jax.weights.mapping import state_dict_source, to_variables

TOL = 1e-4
# transformers' CLIPTextModelWithProjection (ViT-bigG text, projection 1280) and CLIPVisionModelWithProjection
# (openai/clip-vit-large-patch14 vision, projection 768), counted on the meta device.
BIGG_WITH_PROJECTION = 694_659_840
VIT_L14_WITH_PROJECTION = 303_966_208


def abstract(module, inputs):
    return nn.meta.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *inputs))


def n_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree["params"]))


def load_saved(ref, folder, module, inputs):
    """`ref.save_pretrained(folder)`, then its model.safetensors converted onto `module`'s variables."""
    ref.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    return to_variables(state_dict_source(sd), abstract(module, inputs), str(folder), (r"position_ids$",))


def text_ids(eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 16, 7 and 2 tokens, padded after the end-of-text token; the two pooling rules disagree on each row.

    Real EOS (500): every row starts with 999 (the largest id), so argmax of the ids would pick position 0, and is
    padded with EOS itself, so only the *first* EOS is right. Legacy (2): EOS is written as 999 (the largest id),
    padding is 0 and no token equals 2, so a first-position-of-2 rule would pick position 0.
    """
    rng = np.random.default_rng(eos)
    ids = rng.integers(3, 999, (3, 16)).astype(np.int32)
    ids[ids == 500] = 501
    mask = np.zeros_like(ids)
    for row, n in enumerate([16, 7, 2]):
        mask[row, :n] = 1
        if eos == clip_text.LEGACY_EOS_TOKEN_ID:
            ids[row, n - 1], ids[row, n:] = 999, 0
        else:
            ids[row, 0], ids[row, n - 1], ids[row, n:] = 999, eos, eos
    return ids, mask


@pytest.mark.parametrize("eos", [2, 500])
def test_text_with_projection_matches_transformers(tmp_path, eos):
    cfg = CLIPTextConfig.tiny(eos_token_id=eos)
    ref_cfg = transformers.CLIPTextConfig(**dataclasses.asdict(cfg), bos_token_id=998, pad_token_id=0)
    ref = randomize(transformers.CLIPTextModelWithProjection(ref_cfg), seed=eos, scale=0.1)
    module = CLIPTextModelWithProjection(cfg)
    variables = load_saved(ref, tmp_path, module, clip_text.example_inputs(cfg))
    ids, mask = text_ids(eos)
    pos = np.asarray(clip_text.pooled_positions(ids, eos))
    other = np.asarray(clip_text.pooled_positions(ids, 2 if eos != 2 else 500))
    np.testing.assert_array_equal(pos, [15, 6, 1])
    assert np.all(pos != other)  # the test tells the two conventions apart
    with torch.no_grad():
        want = ref(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
        )
    got = jax.jit(module.apply)(variables, ids, mask)
    assert got.text_embeds.shape == (3, 24) and got.hidden_states_last.shape == (3, 16, 32)
    assert rel_err(got.text_embeds, want.text_embeds) < TOL
    assert rel_err(got.hidden_states_last, want.hidden_states[-1]) < TOL
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < TOL
    assert rel_err(got.pooled_output, want.last_hidden_state.numpy()[np.arange(3), pos]) < TOL
    # hidden_states[-1] is the encoder output before final_layer_norm: a different array
    assert rel_err(want.hidden_states[-1], want.last_hidden_state) > 0.1
    # The plain text model shares the tree (without text_projection) and still returns last_hidden_state.
    plain_vars = {"params": {"text_model": variables["params"]["text_model"]}}
    assert jax.tree_util.tree_structure(plain_vars) == jax.tree_util.tree_structure(
        abstract(CLIPTextModel(cfg), clip_text.example_inputs(cfg))
    )
    np.testing.assert_allclose(CLIPTextModel(cfg).apply(plain_vars, ids, mask), got.last_hidden_state, atol=1e-6)


def test_vision_with_projection_matches_transformers(tmp_path, rng):
    cfg = CLIPVisionConfig.tiny()  # quick_gelu, as ViT-L/14
    ref = randomize(
        transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dataclasses.asdict(cfg)))
    )
    module = CLIPVisionModelWithProjection(cfg)
    variables = load_saved(ref, tmp_path, module, clip_vision.example_inputs(cfg))
    assert variables["params"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (7, 7, 3, 32)
    pixels = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    got = jax.jit(module.apply)(variables, pixels)
    assert got.image_embeds.shape == (2, 24) and got.last_hidden_state.shape == (2, 17, 32)
    assert rel_err(got.image_embeds, want.image_embeds) < TOL
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < TOL
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 28, 28, 3\]"):
        module.apply(variables, pixels[:, :21])


def test_full_size_parameter_counts_equal_transformers():
    bigg, vit_l = CLIPTextConfig.vit_bigg(), CLIPVisionConfig.vit_l14()
    with torch.device("meta"):
        text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**dataclasses.asdict(bigg)))
        vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**dataclasses.asdict(vit_l)))
    assert sum(p.numel() for p in text.parameters()) == BIGG_WITH_PROJECTION
    assert sum(p.numel() for p in vision.parameters()) == VIT_L14_WITH_PROJECTION
    assert n_params(abstract(CLIPTextModelWithProjection(bigg), clip_text.example_inputs(bigg))) == BIGG_WITH_PROJECTION
    tree = abstract(CLIPVisionModelWithProjection(vit_l), clip_vision.example_inputs(vit_l))
    assert n_params(tree) == VIT_L14_WITH_PROJECTION
    assert tree["params"]["vision_model"]["embeddings"]["position_embedding"]["embedding"].shape == (257, 1024)


@pytest.mark.parametrize("cls", ["text", "vision"])
def test_param_dtype_reaches_every_leaf(cls):
    if cls == "text":
        cfg = CLIPTextConfig.tiny()
        module, inputs = CLIPTextModelWithProjection(cfg, jnp.bfloat16, jnp.bfloat16), clip_text.example_inputs(cfg)
    else:
        cfg = CLIPVisionConfig.tiny()
        module, inputs = CLIPVisionModelWithProjection(cfg, jnp.bfloat16, jnp.bfloat16), clip_vision.example_inputs(cfg)
    assert {x.dtype for x in jax.tree_util.tree_leaves(abstract(module, inputs))} == {jnp.dtype(jnp.bfloat16)}


def test_preprocess_matches_clip_image_processor(rng):
    """transformers 5's `CLIPImageProcessor` (the torchvision backend, which diffusers' pipelines load), Stable
    Cascade's feature_extractor config; odd sizes that upscale, downscale, resize one side only or none."""
    proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3
    )
    assert proc.backend == "torchvision"
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 53), (501, 333), (224, 301), (97, 97)]]
    rgba = rng.integers(0, 256, (61, 45, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (45, 61, 1), dtype=np.uint8)
    images = [
        *arrays,
        Image.fromarray(arrays[1]),
        rgba,
        Image.fromarray(rgba),  # transparency composited onto white
        grey,
        Image.fromarray(grey[..., 0]).convert("P"),
    ]
    for image in images:
        got = preprocess(image)
        want = proc(image, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        assert got.shape == (1, 224, 224, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # measured: 0 (bit-equal)
    batch = preprocess(arrays[:2])
    np.testing.assert_array_equal(batch, np.concatenate([preprocess(a) for a in arrays[:2]]))
    with pytest.raises(ValueError, match="image 0: expected a PIL image or a uint8 array"):
        preprocess(arrays[0].astype(np.float32))
    with pytest.raises(ValueError, match=r"image 1: expected \[H, W\] or \[H, W, 1\|3\|4\]"):
        preprocess([arrays[0], arrays[0][..., :2]])
