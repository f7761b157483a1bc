"""Pipeline argument checks, prompt weighting, offloading and folder layouts."""

import json
import shutil

import jax
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.pipelines.prompts import parse_weighted, tokenize_weighted

FAST = dict(height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    return wj.WuerstchenPipeline.from_pretrained(decoder=decoder_dir, prior=prior_dir, progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=[]), "`prompt` must be a string or a non-empty list"),
        (dict(prompt=["a", 3]), "`prompt` must be a string or a non-empty list"),
        (dict(prompt=7), "`prompt` must be a string or a non-empty list"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "`negative_prompt` has 3 entries"),
        (dict(height=0), "`height` must be an integer ≥ 1"),
        (dict(width=12.5), "`width` must be an integer ≥ 1"),
        (dict(height=150), "must be a positive multiple of 16"),  # prior latent 4 → decoder latent 42
        (dict(width=20), "must be a positive multiple of 16"),
        (dict(prior_guidance_scale=-1.0), "`guidance_scale` must be a finite number ≥ 0"),
        (dict(decoder_guidance_scale=float("nan")), "`guidance_scale` must be a finite number ≥ 0"),
        (dict(prior_num_inference_steps=0, prior_timesteps=None), "`num_inference_steps` must be an integer ≥ 1"),
        (dict(num_inference_steps=-2), "`num_inference_steps` must be an integer ≥ 1"),
        (dict(prior_timesteps=[1.0, 0.2, 0.5, 0.0]), "descending"),
        (dict(decoder_timesteps=[0.0, 1.0]), "descending"),
        (dict(num_images_per_prompt=0), "`num_images_per_prompt` must be an integer ≥ 1"),
        (dict(seed=[1, 2]), "`seed` as a list needs 1 integers"),
        (dict(seed="x"), "`seed` must be an int or a list of ints"),
        (dict(output_type="pt"), "`output_type` must be"),
        (dict(latents=np.zeros((1, 2, 2, 16))), "`latents` has shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, match):
    args = {**FAST, "prompt": "a red circle", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**args)


def test_missing_component_folder(tiny_checkpoints, tmp_path):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    broken = tmp_path / "wuerstchen"
    shutil.copytree(decoder_dir, broken)
    shutil.rmtree(broken / "vqgan")
    with pytest.raises(wj.WeightsError, match=r"missing component folder\(s\) \['vqgan'\]"):
        wj.WuerstchenPipeline.from_pretrained(decoder=broken, prior=prior_dir, progress=False)
    with pytest.raises(wj.WeightsError, match="no such folder"):
        wj.WuerstchenPipeline.from_pretrained(decoder=tmp_path / "nope", prior=prior_dir, progress=False)


def test_combined_folder_and_offload_give_the_same_images(pipe, tiny_checkpoints, tmp_path):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    combined = tmp_path / "combined"
    shutil.copytree(decoder_dir, combined)
    for part in ("prior", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(prior_dir / part, combined / f"prior_{part}")
    (combined / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenCombinedPipeline"}))
    want = pipe("a red circle", seed=3, **FAST).images
    one_folder = wj.WuerstchenPipeline.from_pretrained(combined, progress=False)
    np.testing.assert_array_equal(one_folder("a red circle", seed=3, **FAST).images, want)
    offloaded = wj.WuerstchenPipeline.from_pretrained(decoder_dir, prior_dir, offload=True, progress=False)
    assert isinstance(next(iter(jax.tree_util.tree_leaves(offloaded.prior_pipe.prior.variables))), np.ndarray)
    np.testing.assert_array_equal(offloaded("a red circle", seed=3, **FAST).images, want)


def test_prompt_embeds_replace_the_prompt(pipe):
    states = pipe.prior_pipe.text(["a red circle"])
    uncond = pipe.prior_pipe.text([""])
    a = pipe("a red circle", seed=1, **FAST).images
    b = pipe(prompt_embeds=states, negative_prompt_embeds=uncond, seed=1, **FAST).images
    # the decoder sees the empty prompt when only embeddings are given, as in diffusers
    c = pipe.decoder_pipe(
        pipe.prior_pipe(
            prompt_embeds=states,
            negative_prompt_embeds=uncond,
            seed=1,
            height=128,
            width=128,
            num_inference_steps=2,
            guidance_scale=4.0,
        ).image_embeddings,
        prompt="",
        num_inference_steps=2,
        seed=1,
        output_type="np",
    ).images
    np.testing.assert_allclose(b, c, atol=1e-6)
    assert a.shape == b.shape


@pytest.mark.parametrize(
    "prompt,want",
    [
        ("a (red car)1.3 on a road", [("a ", 1.0), ("red car", 1.3), (" on a road", 1.0)]),
        ("a cat++ and a dog--", [("a ", 1.0), ("cat", 1.1**2), (" and a ", 1.0), ("dog", 0.9**2)]),
        ("(a dog)+ well-known", [("a dog", 1.1), (" well-known", 1.0)]),
        ("(a)0.5(b)2", [("a", 0.5), ("b", 2.0)]),
        ("plain (unbalanced", [("plain (unbalanced", 1.0)]),
    ],
)
def test_compel_syntax(prompt, want):
    got = parse_weighted(prompt)
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want])


def test_weighted_prompt_tokens_and_embeddings(pipe):
    tok = pipe.prior_pipe.text.tokenizer
    ids, mask, weights = tokenize_weighted(tok, "a (red)2.0 circle")
    plain_ids = tok("a red circle").input_ids
    assert list(ids[: len(plain_ids)]) == plain_ids and mask.sum() == len(plain_ids)
    assert list(weights[: len(plain_ids)]) == [1.0, 1.0, 2.0, 1.0, 1.0]
    text = pipe.prior_pipe.text
    plain, weighted, unit = text(["a red circle"]), text(["a (red)2.0 circle"]), text(["a (red)1.0 circle"])
    empty = text([""])
    np.testing.assert_allclose(unit, plain, atol=1e-6)  # weight 1 changes nothing
    np.testing.assert_allclose(weighted[:, 2], empty[:, 2] + 2.0 * (plain[:, 2] - empty[:, 2]), atol=1e-5)
    np.testing.assert_allclose(weighted[:, 3], plain[:, 3], atol=1e-6)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long = " ".join(["circle"] * 100) + " square"  # a text of its own: no earlier test has had it reported
    with caplog.at_level("WARNING"):
        states = pipe.prior_pipe.text([long])
        pipe.decoder_pipe.text([long, long])  # the decoder's tokenizer and a repeat: not reported again
    assert states.shape[1] == 77
    assert caplog.text.count("truncated") == 1 and "square" in caplog.text
    assert "indexing errors" not in caplog.text  # no tokenizer-library warning beside ours


def test_offload_lowers_peak_device_memory(tiny_checkpoints):
    from wurst_jax.pipelines import peak_device_memory

    decoder_dir, prior_dir, _ = tiny_checkpoints
    peaks = {}
    for offload in (False, True):
        pipe = wj.WuerstchenPipeline.from_pretrained(decoder_dir, prior_dir, offload=offload, progress=False)
        peak_device_memory(reset=True)
        pipe("a red circle", seed=0, **FAST)
        peaks[offload] = peak_device_memory()
        del pipe
    weights = sum(
        x.nbytes
        for name in ("prior", "text_encoder")
        for x in jax.tree_util.tree_leaves(wj.load_component(prior_dir / name)[1])
    )
    assert peaks[True] < peaks[False]
    assert peaks[False] - peaks[True] >= 0.5 * weights  # the prior's stage is off the device while the decoder runs
