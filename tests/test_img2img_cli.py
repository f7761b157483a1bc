"""Image-to-image on Stable Cascade (`init_image=` / `strength=`), Würstchen v2 image variation (`image=` on the
decoder pipeline) and `wurst-jax generate --init-image / --strength / --effnet / --image`, on tiny random folders
with a tiny random EfficientNet encoder exported as a component folder.

Every prior call here has 4 steps and guidance 4, so the Stable Cascade tests share three compiled loops
(one image with a start image, one without, two images with one)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from cascade_checkpoints import build
from conftest import rel_err, torch_effnet
from PIL import Image
from test_cli import run_cli

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.pipelines import image_to_image, random
from wurst_jax.pipelines.outputs import ImagePipelineOutput

H, W = 128, 256  # Stable Cascade: stage C grid 3×6, the image seen at 96×192 by the encoder


@pytest.fixture(scope="module")
def sc_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc_img2img")
    build(root)
    return root / "stable-cascade", root / "stable-cascade-prior"


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    """A tiny EfficientNet encoder in Stable Cascade's layout (mapper BatchNorm without affine terms), 16 channels
    out, saved by diffusers (the torch module is the reference); returns (torch module, our module, variables,
    folder)."""
    cfg = dataclasses.replace(wj.EfficientNetConfig.tiny(), c_latent=16, mapper_affine=False)
    ref = torch_effnet(cfg, seed=0)
    folder = tmp_path_factory.mktemp("effnet") / "effnet"
    ref.save_pretrained(folder)
    module, variables = wj.load_component(folder)
    return ref, module, variables, folder


@pytest.fixture(scope="module")
def sc_prior(sc_folders, effnet):
    pipe = wj.StableCascadePriorPipeline.from_pretrained(sc_folders[1], progress=False)
    pipe.load_effnet(effnet[3])  # the saved folder, as a user loads it
    return pipe


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((2, H, W, 3)).astype(np.float32)


PROMPTS = ["a red circle", "a blue square"]
STRENGTHS = (1e-3, 0.25, 0.5)


def run(pipe, prompt=PROMPTS, **kw):
    """Two images (prompt 0 / seed 5, prompt 1 / seed 6), 4 prior steps, guided: one compiled loop with a start
    image, one without, for every call here."""
    opts = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.0, seed=[5, 6])
    return pipe(prompt, **{**opts, **kw}).image_embeddings


def test_encoding_follows_the_original_recipe(sc_prior, effnet, images):
    """`init_image` → latents as the original's `encode_latents(resize_image(image))`: torchvision's antialiased
    bilinear resize (here to 32× stage C's grid), ImageNet Normalize, the EfficientNet (torch, same weights)."""
    torch = pytest.importorskip("torch")
    import torchvision.transforms.functional as F

    ours = image_to_image.encode_images(sc_prior, list(images), (3, 6), 16)
    x = F.resize(torch.from_numpy(images).permute(0, 3, 1, 2), [96, 192], antialias=True)
    x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        ref = effnet[0](x).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape == (2, 3, 6, 16)
    assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


def test_strength_one_is_text_to_image(sc_prior, images):
    np.testing.assert_array_equal(run(sc_prior, init_image=images[0], strength=1.0), run(sc_prior))


def test_strength_to_zero_returns_the_encoding_and_distance_grows(sc_prior, images):
    want = image_to_image.encode_images(sc_prior, images[0], (3, 6), 16)[0]
    # strength s with round(4 / s) steps: always 4 steps, from t = s (the same compiled loop). Below t ≈ 2.5e-3 the
    # scheduler's alpha_cumprod is clamped to 0.9999 (as diffusers'): the start is sqrt(0.9999)·emb + 0.01·noise and
    # the steps leave it as it is (alpha = 1), so strength 1e-3 returns the encoding with 1 % of the seed's noise.
    got = {s: run(sc_prior, init_image=images[0], strength=s, num_inference_steps=round(4 / s))[0] for s in STRENGTHS}
    got[1.0] = run(sc_prior)[0]  # text-to-image
    noise = random.draw(random.image_keys([5], 1), random.Stream.PRIOR_LATENTS, want.shape)[0]
    ac = jnp.float32(0.9999)
    assert rel_err(got[1e-3], jnp.sqrt(ac) * want + jnp.sqrt(1 - ac) * noise) < 1e-6
    # so it is the encoding up to that floor: |got - want| <= (1 - sqrt(0.9999))·|want| + 0.01·|noise| (max norms)
    floor = (1 - float(jnp.sqrt(ac))) * np.abs(want).max() + 0.01 * np.abs(noise).max()
    assert np.abs(got[1e-3] - want).max() <= floor * (1 + 1e-5)
    dist = [float(np.abs(got[s] - want).mean()) for s in (*STRENGTHS, 1.0)]
    assert dist == sorted(dist) and dist[0] < 1e-3 * dist[-1], dist


def test_batches_of_prompts_and_images(sc_prior, images):
    opts = dict(strength=0.5, num_inference_steps=8)
    two_prompts = run(sc_prior, init_image=images[0], **opts)  # prompt 0 and 1 over image 0
    two_images = run(sc_prior, PROMPTS[0], init_image=list(images), **opts)  # prompt 0 over images 0 and 1
    swapped = run(sc_prior, PROMPTS[0], init_image=[images[1], images[0]], **{**opts, "seed": [6, 5]})
    assert two_prompts.shape == two_images.shape == (2, 3, 6, 16)
    # the same (prompt, image, seed) gives the same row wherever it sits in the batch
    assert rel_err(two_images[0], two_prompts[0]) < 1e-5 and rel_err(swapped[1], two_images[0]) < 1e-5
    assert rel_err(swapped[0], two_images[1]) < 1e-5
    assert rel_err(two_images[1], two_images[0]) > 1e-2 and rel_err(two_prompts[1], two_prompts[0]) > 1e-2
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        run(sc_prior, init_image=[images[0]] * 3, strength=0.5)
    with pytest.raises(ValueError, match="`init_image`"):
        run(sc_prior, strength=0.5)
    effnet, sc_prior.effnet = sc_prior.effnet, None
    try:
        with pytest.raises(ValueError, match="load_effnet"):
            run(sc_prior, init_image=images[0], strength=0.5)
    finally:
        sc_prior.effnet = effnet


def test_effnet_from_the_original_file(tmp_path):
    """`load_effnet` / `--effnet` read Stable Cascade's `effnet_encoder.safetensors` itself (EfficientNetV2-S, the
    config read off its tensors); loading only, nothing compiles."""
    from safetensors.torch import save_file

    ref = torch_effnet(wj.EfficientNetConfig(mapper_affine=False), seed=1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "effnet_encoder.safetensors")
    eff = image_to_image.load_effnet(str(tmp_path / "effnet_encoder.safetensors"), jnp.float32)
    assert eff.module.config == wj.EfficientNetConfig(mapper_affine=False)
    kernel = np.asarray(eff.variables["params"]["mapper_0"]["kernel"])[0, 0]  # [1280, 16] of the 1×1 conv
    np.testing.assert_array_equal(kernel, ref.mapper[0].weight.detach()[:, :, 0, 0].T.numpy())
    var = np.asarray(eff.variables["batch_stats"]["mapper_1"]["var"])
    np.testing.assert_array_equal(var, ref.mapper[1].running_var.numpy())


def test_v2_variation_from_an_image(tiny_checkpoints, effnet, images, monkeypatch):
    """`image=` on the v2 decoder pipeline decodes `embed_images(image)` exactly as `image_embeddings=` would (the
    decoder itself runs end to end in the command-line test below; here its loop is replaced, nothing compiles but
    the encoder)."""
    pipe = wj.WuerstchenDecoderPipeline.from_pretrained(tiny_checkpoints[0], progress=False)
    pipe.load_effnet((effnet[1], effnet[2]))
    seen = []
    monkeypatch.setattr(pipe, "_decode", lambda emb, b, *rest: seen.append((np.asarray(emb), b, rest)))
    image = images[0][:, :128]  # 128²: a 3×3 grid (10.67 · 4 pixels per cell), seen at 96² by the encoder
    opts = dict(prompt="a cat", num_inference_steps=2, seed=1, output_type="latent")
    pipe(image=image, **opts)
    emb = pipe.embed_images(image)
    pipe(emb, **opts)
    assert emb.shape == (1, 3, 3, 16) and seen[0][1] == seen[1][1] == 1 and seen[0][2] == seen[1][2]
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    np.testing.assert_array_equal(emb, image_to_image.encode_images(pipe, image, (3, 3), 16))
    assert pipe.embed_images(image, height=128, width=256).shape == (1, 3, 6, 16)  # another output size
    with pytest.raises(ValueError, match="exactly one of"):
        pipe(emb, image=image)
    with pytest.raises(ValueError, match="must be a positive multiple"):
        pipe.embed_images(image, height=64)  # a 2-cell grid: a decoder latent stage B cannot halve


# ---------------------------------------------------------------------------------------------- the command line


def _png(path, size=(96, 80), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)).save(path)
    return str(path)


def test_cli_v2_init_image_and_variation(tiny_checkpoints, effnet, tmp_path):
    """Both v2 runs share one compilation cache: the variation's encoder, decoder and VQGAN programs are the
    image-to-image run's (same sizes, steps, seed), so the second run mostly loads."""
    dec, prior = tiny_checkpoints[:2]
    common = ["a cat", "--model", str(dec), "--prior", str(prior), "--height", "128", "--width", "128", "--steps", "2"]
    common += ["--dtype", "float32", "--seed", "3", "--cache-dir", str(tmp_path / "cache"), "--effnet", str(effnet[3])]
    start = _png(tmp_path / "start.png")
    res = run_cli("generate", *common, "--prior-steps", "4", "--init-image", start, "--strength", "0.5", "--out",
                  str(tmp_path / "i2i.png"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "effnet: compiled" in res.stderr and "(2 steps × 1 images + CFG, latent 3×3)" in res.stderr
    res = run_cli("generate", *common, "--image", start, "--out", str(tmp_path / "var.png"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(tmp_path / "var.png")]
    assert "effnet: compiled" in res.stderr and "prior" not in res.stderr  # the decoder only
    for name in ("i2i.png", "var.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (128, 128)


def test_cli_cascade_init_image(sc_folders, sc_prior, images, effnet, tmp_path, capsys, monkeypatch):
    """`generate --init-image` on a Stable Cascade model, in this process: the real prior (this module's) with the
    decoder pipeline's stages B and A replaced by a recorder (image-to-image does not change them;
    tests/test_cascade_cli.py runs them). Two images: the loop compiled for `run`'s pairs. The prior's output
    equals the Python call's."""
    decoder = wj.StableCascadeDecoderPipeline.from_pretrained(sc_folders[0], progress=False)
    seen = []

    def decode(emb, n, *rest):
        seen.append(np.asarray(emb)[:n])
        return ImagePipelineOutput([Image.new("RGB", (W, H))] * n)

    monkeypatch.setattr(decoder, "_decode", decode)
    built = []

    def from_pretrained(cls, decoder=None, prior=None, **kw):
        built.append((decoder, prior, kw["dtype"]))
        return cls(sc_prior, decoder_pipe)

    decoder_pipe = decoder
    monkeypatch.setattr(wj.StableCascadeCombinedPipeline, "from_pretrained", classmethod(from_pretrained))
    start = tmp_path / "start.png"
    Image.fromarray((images[0] * 255).astype(np.uint8)).save(start)
    argv = ["generate", PROMPTS[0], "--model", str(sc_folders[0]), "--prior", str(sc_folders[1]), "--height", str(H),
            "--width", str(W), "--prior-steps", "8", "--steps", "2", "--dtype", "float32", "--seed", "3",
            "--no-cache", "--quiet", "--num-images", "2", "--init-image", str(start), "--strength", "0.5",
            "--effnet", str(effnet[3]), "--out", str(tmp_path / "sc.png")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert built == [(str(sc_folders[0]), str(sc_folders[1]), jnp.float32)] and len(seen) == 1
    with Image.open(start) as im:
        want = run(sc_prior, PROMPTS[0], init_image=im, strength=0.5, num_inference_steps=8, seed=3,
                   num_images_per_prompt=2)  # fmt: skip
    np.testing.assert_array_equal(seen[0], want)
    assert (tmp_path / "sc_0.png").is_file() and (tmp_path / "sc_1.png").is_file()


def test_cli_bad_image_inputs(tiny_checkpoints, sc_folders, effnet, tmp_path, capsys):
    dec, prior = tiny_checkpoints[:2]
    v2 = ["generate", "a cat", "--model", str(dec), "--prior", str(prior), "--out", str(tmp_path / "o.png")]
    sc = ["generate", "a cat", "--model", str(sc_folders[0]), "--prior", str(sc_folders[1])]
    sc += ["--out", str(tmp_path / "o.png")]
    ok, eff = _png(tmp_path / "ok.png"), ["--effnet", str(effnet[3])]
    (tmp_path / "bad.png").write_text("not a picture")
    cases = [
        (v2 + ["--init-image", str(tmp_path / "missing.png"), *eff], "--init-image"),
        (sc + ["--init-image", str(tmp_path / "bad.png"), *eff], "cannot read it as an image"),
        (v2 + ["--init-image", ok, "--strength", "0", *eff], "--strength 0.0: expected a number in (0, 1]"),
        (sc + ["--init-image", ok, "--strength", "1.5", *eff], "--strength 1.5"),
        (v2 + ["--strength", "0.5"], "--strength needs --init-image"),
        (sc + ["--init-image", ok], "--init-image needs --effnet"),
        (v2 + ["--image", ok], "--image needs --effnet"),
        (v2 + ["--image", ok, "--image", ok, *eff], "takes one image"),
        (v2 + ["--init-image", ok, "--effnet", str(tmp_path / "nope")], "--effnet"),
        (sc + eff, "--effnet is used only with"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o.png").exists()
