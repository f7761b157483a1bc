"""Stable Cascade pipelines against diffusers 0.42's on the same tiny random folders, and diffusers' bugs fixed.

diffusers runs with every random draw (initial decoder latents, each scheduler step) served from arrays that
our pipelines get as `latents` / `step_noise`, so both compute the same deterministic function.
"""

import numpy as np
import pytest
import torch
from cascade_checkpoints import build
from conftest import nchw, nhwc, rel_err
from PIL import Image

import wurst_jax as wj

SIZE = (128, 256)  # prior latent 3×6, decoder latent 32×64: non-square
PRIOR_STEPS, DECODER_STEPS = 3, 2


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc")
    ref = build(root)
    pipe = wj.StableCascadeCombinedPipeline.from_pretrained(
        root / "stable-cascade", prior=root / "stable-cascade-prior", progress=False
    )
    return root, ref, pipe


def replay(monkeypatch, call, noises, **kwargs):
    """Run a diffusers pipeline call with every randn served from `noises` (NCHW tensors), in order."""
    import diffusers.pipelines.stable_cascade.pipeline_stable_cascade as dec_mod
    import diffusers.pipelines.stable_cascade.pipeline_stable_cascade_prior as prior_mod
    import diffusers.schedulers.scheduling_ddpm_wuerstchen as sched_mod

    queue = list(noises)

    def fake_randn(shape, **_):
        t = queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t

    for mod in (sched_mod, dec_mod, prior_mod):
        monkeypatch.setattr(mod, "randn_tensor", fake_randn)
    with torch.no_grad():
        out = call(**kwargs)
    assert not queue
    return out


def noise(pipe, n, seed=0):
    """Initial prior latents, prior step noise, decoder latents, decoder step noise (NHWC, f32)."""
    rng = np.random.default_rng(seed)
    h, w = pipe.prior_pipe.latent_size(*SIZE)
    hd, wd = pipe.decoder_pipe.latent_size(h, w)
    return (
        rng.standard_normal((n, h, w, 16), np.float32),
        rng.standard_normal((PRIOR_STEPS, n, h, w, 16), np.float32),
        rng.standard_normal((n, hd, wd, 4), np.float32),
        rng.standard_normal((DECODER_STEPS, n, hd, wd, 4), np.float32),
    )


def pictures():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, s, np.uint8)) for s in ((40, 30, 3), (25, 50, 3))]


@pytest.mark.parametrize(
    "case",
    [
        dict(prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "dark"], n_per=1, dec_w=0.0),
        dict(prompt="a photo", images=True, n_per=2, dec_w=2.0),  # variation: two images → two image tokens
    ],
    ids=["text", "variation"],
)
def test_combined_matches_diffusers(sc, monkeypatch, case):
    _, ref, pipe = sc
    b = 1 if isinstance(case["prompt"], str) else len(case["prompt"])
    n = b * case["n_per"]
    latents, prior_noise, dec_latents, dec_noise = noise(pipe, n)
    common = dict(
        prompt=case["prompt"],
        negative_prompt=case.get("negative_prompt"),
        images=pictures() if case.get("images") else None,
        height=SIZE[0],
        width=SIZE[1],
        prior_num_inference_steps=PRIOR_STEPS,
        prior_guidance_scale=4.0,
        num_inference_steps=DECODER_STEPS,
        decoder_guidance_scale=case["dec_w"],
        num_images_per_prompt=case["n_per"],
    )
    noises = [nchw(x) for x in prior_noise] + [nchw(dec_latents)] + [nchw(x) for x in dec_noise]
    want = replay(monkeypatch, ref["combined"], noises, latents=nchw(latents), output_type="np", **common).images
    got = pipe(
        **common,
        latents=latents,
        decoder_latents=dec_latents,
        prior_step_noise=prior_noise,
        decoder_step_noise=dec_noise,
        output_type="np",
    ).images
    assert got.shape == want.shape == (n, *SIZE, 3)
    err = float(np.max(np.abs(got - want)))
    inside = float(np.mean((want > 0.01) & (want < 0.99)))
    print(f"{case}: max abs pixel error vs diffusers {err:.2e} ({inside:.0%} of pixels unclamped)")
    assert err < 1e-3, err
    assert got.std() > 1e-3 and inside > 0.1  # a real image, not a constant or a saturated one


def test_prior_matches_diffusers(sc, monkeypatch):
    _, ref, pipe = sc
    prompts = ["a red circle", "a blue square"]
    latents, prior_noise, _, _ = noise(pipe, 2, seed=1)
    common = dict(height=SIZE[0], width=SIZE[1], num_inference_steps=PRIOR_STEPS, guidance_scale=4.0)
    want = replay(monkeypatch, ref["prior"], [nchw(x) for x in prior_noise], prompt=prompts, latents=nchw(latents),
                  output_type="pt", **common)  # fmt: skip
    got = pipe.prior_pipe(prompts, latents=latents, step_noise=prior_noise, **common)
    err = rel_err(got.image_embeddings, nhwc(want.image_embeddings))
    text_err = rel_err(got.prompt_embeds, want.prompt_embeds.numpy())
    pooled_err = rel_err(got.prompt_embeds_pooled, want.prompt_embeds_pooled.numpy())
    neg_err = rel_err(got.negative_prompt_embeds_pooled, want.negative_prompt_embeds_pooled.numpy())
    print(f"prior image_embeddings rel err {err:.2e}; text {text_err:.2e}, pooled {pooled_err:.2e}, neg {neg_err:.2e}")
    assert err < 1e-4 and max(text_err, pooled_err, neg_err) < 1e-5
    assert got.prompt_embeds_pooled.shape == (2, 1, 12)


def test_decoder_matches_diffusers(sc, monkeypatch):
    """The decoder on its own: its own text encoder, guidance with a negative prompt."""
    _, ref, pipe = sc
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((2, 3, 6, 16), np.float32)
    _, _, dec_latents, dec_noise = noise(pipe, 2, seed=2)
    common = dict(prompt=["a cat", "a dog"], negative_prompt=["ugly", "blurry"], num_inference_steps=DECODER_STEPS,
                  guidance_scale=2.0)  # fmt: skip
    want = replay(monkeypatch, ref["decoder"], [nchw(x) for x in dec_noise], image_embeddings=nchw(emb),
                  latents=nchw(dec_latents), output_type="np", **common).images  # fmt: skip
    got = pipe.decoder_pipe(emb, latents=dec_latents, step_noise=dec_noise, output_type="np", **common).images
    err = float(np.max(np.abs(got - want)))
    print(f"decoder: max abs pixel error vs diffusers {err:.2e}")
    assert err < 1e-3


# ---------------------------------------------------------------- where diffusers is wrong, we are not


def test_single_image_equals_a_list_of_one(sc):
    """diffusers rejects `images=<one PIL image>` (it iterates over it); one image is one image token."""
    _, _, pipe = sc
    kw = dict(height=SIZE[0], width=SIZE[1], num_inference_steps=PRIOR_STEPS, seed=3)
    one = pipe.prior_pipe("a photo", images=pictures()[0], **kw).image_embeddings
    listed = pipe.prior_pipe("a photo", images=pictures()[:1], **kw).image_embeddings
    text_only = pipe.prior_pipe("a photo", **kw).image_embeddings
    np.testing.assert_array_equal(one, listed)
    assert np.abs(one - text_only).max() > 1e-4  # the image conditions the prior


def test_custom_timesteps_are_used(sc):
    """diffusers accepts `timesteps` and ignores it; here they are the schedule."""
    _, _, pipe = sc
    kw = dict(prompt="a photo", height=SIZE[0], width=SIZE[1], seed=4)
    even = pipe.prior_pipe(num_inference_steps=PRIOR_STEPS, **kw).image_embeddings
    same = pipe.prior_pipe(timesteps=np.linspace(1, 0, PRIOR_STEPS + 1).tolist(), **kw).image_embeddings
    other = pipe.prior_pipe(timesteps=[1.0, 0.9, 0.8, 0.0], **kw).image_embeddings
    np.testing.assert_allclose(same, even, atol=1e-6)
    assert np.abs(other - even).max() > 1e-3


def test_precomputed_embeddings(sc):
    """2-D pooled embeddings read as one token (diffusers mis-shapes them); decoder guidance with precomputed
    embeddings and no negative ones (diffusers crashes) uses the negative prompt's; the combined pipeline with
    decoder guidance and no prior guidance (diffusers crashes) too."""
    _, _, pipe = sc
    prior = pipe.prior_pipe
    kw = dict(height=SIZE[0], width=SIZE[1], num_inference_steps=PRIOR_STEPS, seed=5)
    out = prior(["a red circle", "a blue square"], **kw)
    embeds = dict(prompt_embeds=out.prompt_embeds, negative_prompt_embeds=out.negative_prompt_embeds,
                  negative_prompt_embeds_pooled=out.negative_prompt_embeds_pooled)  # fmt: skip
    flat = prior(prompt_embeds_pooled=out.prompt_embeds_pooled[:, 0], **embeds, **kw).image_embeddings
    np.testing.assert_allclose(flat, out.image_embeddings, atol=1e-6)

    dec = pipe.decoder_pipe
    dkw = dict(num_inference_steps=DECODER_STEPS, guidance_scale=2.0, seed=6, output_type="np")
    emb = out.image_embeddings
    from_prompt = dec(emb, prompt=["a red circle", "a blue square"], **dkw).images
    pooled = dec.text.with_pooled(["a red circle", "a blue square"])[1]
    precomputed = dec(emb, prompt_embeds_pooled=pooled, **dkw).images
    np.testing.assert_allclose(precomputed, from_prompt, atol=1e-6)

    ckw = dict(height=SIZE[0], width=SIZE[1], prior_num_inference_steps=PRIOR_STEPS,
               num_inference_steps=DECODER_STEPS, seed=7, output_type="np")  # fmt: skip
    ckw.update(num_images_per_prompt=2)  # the decoder's shapes of the parity cases: their programs are reused
    guided = pipe("a red circle", prior_guidance_scale=1.0, decoder_guidance_scale=2.0, **ckw).images
    plain = pipe("a red circle", prior_guidance_scale=1.0, decoder_guidance_scale=0.0, **ckw).images
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-3


def test_shared_negative_prompt_and_image_embeds(sc):
    """One negative string for a list of prompts (diffusers fails: one row for B); `image_embeds` shared ([1, k, P],
    also 2-D [1, P]) or per prompt ([B, k, P]; diffusers repeats a B-row batch B times over)."""
    _, _, pipe = sc
    kw = dict(
        prompt=["a red circle", "a blue square"], height=SIZE[0], width=SIZE[1], num_inference_steps=PRIOR_STEPS, seed=9
    )
    one = pipe.prior_pipe(negative_prompt="blurry", **kw).image_embeddings
    listed = pipe.prior_pipe(negative_prompt=["blurry", "blurry"], **kw).image_embeddings
    np.testing.assert_array_equal(one, listed)
    e = np.random.default_rng(0).standard_normal((1, 1, 10)).astype(np.float32)
    shared = pipe.prior_pipe(image_embeds=e, **kw).image_embeddings
    for same in (e[:, 0], np.repeat(e, 2, axis=0)):
        np.testing.assert_allclose(pipe.prior_pipe(image_embeds=same, **kw).image_embeddings, shared, atol=1e-6)
    per_prompt = pipe.prior_pipe(image_embeds=np.concatenate([e, -e]), **kw).image_embeddings
    np.testing.assert_allclose(per_prompt[0], shared[0], atol=1e-6)
    assert np.abs(per_prompt[1] - shared[1]).max() > 1e-4


def test_combined_folder_loads(sc):
    """diffusers' combined layout (prior_prior/, prior_text_encoder/, …, decoder/, …) in one folder."""
    import jax

    root, ref, pipe = sc
    ref["combined"].save_pretrained(root / "combined")
    one = wj.StableCascadeCombinedPipeline.from_pretrained(root / "combined", progress=False)
    for a, b in [(one.prior_pipe.prior, pipe.prior_pipe.prior), (one.decoder_pipe.vqgan, pipe.decoder_pipe.vqgan),
                 (one.prior_pipe.images.encoder, pipe.prior_pipe.images.encoder)]:  # fmt: skip
        jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, b.variables)
    assert one.prior_pipe.images.processor.crop_size == (28, 28)


def test_bad_inputs_name_the_argument(sc):
    _, _, pipe = sc
    kw = dict(height=SIZE[0], width=SIZE[1], num_inference_steps=1)
    with pytest.raises(ValueError, match="prompt_embeds_pooled"):
        pipe.prior_pipe(prompt_embeds=np.zeros((1, 77, 12), np.float32), **kw)
    with pytest.raises(ValueError, match="image_embeds"):
        pipe.prior_pipe("x", image_embeds=np.zeros((1, 1, 7), np.float32), **kw)
    with pytest.raises(ValueError, match="at most one of `images` and `image_embeds`"):
        pipe.prior_pipe("x", images=pictures(), image_embeds=np.zeros((1, 1, 10), np.float32), **kw)
    with pytest.raises(ValueError, match="decoder latent"):
        pipe("x", height=64, width=64)  # prior 2×2 → decoder 21×21: stage B patches by 2
    with pytest.raises(ValueError, match="image_embeddings"):
        pipe.decoder_pipe(np.zeros((1, 3, 6, 4), np.float32), prompt="x")


def test_bf16_against_f32_every_step(sc):
    """The whole chain in bf16 (weights and compute) against f32, one sampler step per call: every step finite."""
    import jax
    import jax.numpy as jnp

    from wurst_jax.pipelines.runner import decode_images

    root, _, pipe32 = sc
    pipe16 = wj.StableCascadeCombinedPipeline.from_pretrained(
        root / "stable-cascade", prior=root / "stable-cascade-prior", dtype=jnp.bfloat16, progress=False
    )
    lat, prior_noise, dec_lat, dec_noise = noise(pipe32, 1, seed=8)
    tp, td = np.linspace(1, 0, PRIOR_STEPS + 1), np.linspace(1, 0, DECODER_STEPS + 1)

    def chain(pipe):
        states, x = [], lat
        for i in range(PRIOR_STEPS):
            x = pipe.prior_pipe("a red circle", height=SIZE[0], width=SIZE[1], timesteps=tp[i : i + 2], latents=x,
                                step_noise=prior_noise[i : i + 1]).image_embeddings  # fmt: skip
            states.append(x)
        emb, x = x, dec_lat
        for i in range(DECODER_STEPS):
            x = pipe.decoder_pipe(emb, "a red circle", timesteps=td[i : i + 2], latents=x,
                                  step_noise=dec_noise[i : i + 1], output_type="latent").images  # fmt: skip
            states.append(x)
        vq = pipe.decoder_pipe.vqgan
        return states, np.asarray(jax.jit(decode_images, static_argnames="module")(vq.variables, x, module=vq.module))

    (s32, img32), (s16, img16) = chain(pipe32), chain(pipe16)
    errs = [rel_err(a, b) for a, b in zip(s16, s32, strict=True)]
    pixel = float(np.abs(img16 - img32).max())
    print(f"bf16 vs f32 rel err per step (prior, then decoder): {[f'{e:.1e}' for e in errs]}; pixels max {pixel:.3f}")
    assert all(np.isfinite(s).all() for s in s16) and np.isfinite(img16).all()
    assert max(errs) < 0.05 and pixel < 0.05, (errs, pixel)  # measured: 1.3e-2, 0.017


def test_sharded_and_offloaded_equals_one_device(sc):
    """fsdp over a 4-device data axis (2 images: the batch is padded) with offloaded stages, against one device
    (the variation case's shapes: one device reuses its programs)."""
    import jax

    root, _, pipe = sc
    mesh = wj.make_mesh(data=4, model=1, devices=jax.devices()[:4])
    sharded = wj.StableCascadeCombinedPipeline.from_pretrained(
        root / "stable-cascade", prior=root / "stable-cascade-prior", mesh=mesh, sharding="fsdp", offload=True,
        progress=False,
    )  # fmt: skip
    kw = dict(height=SIZE[0], width=SIZE[1], prior_num_inference_steps=PRIOR_STEPS, num_inference_steps=DECODER_STEPS)
    kw.update(num_images_per_prompt=2, images=pictures(), decoder_guidance_scale=2.0, output_type="np", seed=11)
    want = pipe("a photo", **kw).images
    got = sharded("a photo", **kw).images
    assert got.shape == (2, *SIZE, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)  # XLA's CPU summation order differs per layout


def test_weighted_prompt_moves_the_states_not_the_pooled_embedding(sc):
    text = sc[2].prior_pipe.text
    states, pooled = text.with_pooled(["a (red)1.5 circle"])
    plain_states, plain_pooled = text.with_pooled(["a red circle"])
    np.testing.assert_allclose(pooled, plain_pooled, atol=1e-6)
    assert np.abs(states - plain_states).max() > 1e-4
