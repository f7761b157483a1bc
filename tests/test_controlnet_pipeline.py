"""A stage C ControlNet in the Stable Cascade pipelines and the CLI, on the tiny random folders of
`cascade_checkpoints.build`: a zero ControlNet changes nothing, a random one does, the scale and the image change
the output through one compiled prior loop, inpainting reads only the unmasked pixels, and `wurst-jax generate
--control` runs end to end and refuses bad flags with exit 2."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cascade_checkpoints import build
from conftest import rel_err
from PIL import Image

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.controlnet import stage_c
from wurst_jax.models.cascade import ControlNetConfig, StableCascadeControlNet

SIZE = (128, 256)
# the prior pipeline's latents: the control acts there (the decoder runs in the CLI test)
KW = dict(height=SIZE[0], width=SIZE[1], num_inference_steps=3, seed=3)
# tiny_prior's 16-channel ResBlocks are the first (down level 0) and the last (up level 0): ordinals 0 and 5
CANNY = dataclasses.replace(ControlNetConfig.tiny(), proj_blocks=(0, 5))
INPAINT = dataclasses.replace(ControlNetConfig.tiny(), c_in=4, proj_blocks=(0, 5))


def controlnet(cfg, random_weights):
    module = StableCascadeControlNet(cfg)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 64, 64, cfg.c_in)))
    if random_weights:  # the released files' last projections are trained; init leaves them zero
        leaves, tree = jax.tree_util.tree_flatten(variables["params"])
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
        variables = {**variables, "params": jax.tree_util.tree_unflatten(tree, noisy)}
    return module, variables


def picture(seed, size=(96, 192)):
    rng = np.random.default_rng(seed)
    img = np.zeros((*size, 3), np.uint8)  # blocks: edges for Canny
    for _ in range(6):
        y, x = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        img[y : y + 24, x : x + 40] = rng.integers(0, 256, 3)
    return img


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc")
    build(root)
    pipe = wj.StableCascadeCombinedPipeline.from_pretrained(
        root / "stable-cascade", prior=root / "stable-cascade-prior", progress=False
    )
    return root, pipe.prior_pipe


def prior_compiles(pipe):
    return sum(1 for key in pipe.compiler._executables if key[0] == "prior")


def run(pipe, prompt, **kw):
    return pipe(prompt, **KW, **kw).image_embeddings


def test_zero_controlnet_equals_none_and_a_random_one_changes_the_images(sc):
    _, pipe = sc
    plain = run(pipe, "a red cube")
    pipe.load_controlnet(controlnet(CANNY, False))
    zero = run(pipe, "a red cube", control_image=picture(0))
    print(f"zero ControlNet vs none: rel err {rel_err(zero, plain):.2e}")
    assert rel_err(zero, plain) < 1e-5
    pipe.load_controlnet(controlnet(CANNY, True))
    compiles = prior_compiles(pipe)
    one = run(pipe, "a red cube", control_image=picture(0))
    assert rel_err(one, plain) > 1e-3
    half = run(pipe, "a red cube", control_image=picture(0), controlnet_conditioning_scale=0.5)
    other = run(pipe, "a red cube", control_image=Image.fromarray(picture(1)))
    off = run(pipe, "a red cube", control_image=picture(1), controlnet_conditioning_scale=0.0)
    assert rel_err(half, one) > 1e-4 and rel_err(other, one) > 1e-4
    assert rel_err(off, plain) < 1e-5  # scale 0: the control is zero
    assert prior_compiles(pipe) == compiles  # scale and image are arguments of the one compiled loop
    pipe.load_controlnet(None)


def test_control_reaches_the_prior_as_compute_control_says(sc):
    """The prior pipeline's cond carries the control of `compute_control` on the Canny condition, per image."""
    _, pipe = sc
    module, variables = controlnet(CANNY, True)
    pipe.load_controlnet((module, variables))
    got = pipe._control(2, picture(2), 0.7, None)
    want = stage_c.compute_control(module, variables, stage_c.make_condition("canny", picture(2)[None]), 0.7)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape[0] == 2 and rel_err(g, np.repeat(np.asarray(w), 2, 0)) < 1e-6
    pipe.load_controlnet(None)


def test_inpainting_reads_only_the_unmasked_pixels(sc):
    """The original's recipe (inference/controlnet.ipynb): the ControlNet sees the image with the masked pixels
    white + the mask, and stage C starts from noise; nothing else of the image is used, so what lies under the mask
    cannot change the result, while the unmasked pixels do. (The original does not paste the unmasked region back;
    `filters.composite` does that on request.)"""
    _, pipe = sc
    pipe.load_controlnet(controlnet(INPAINT, True))
    mask = np.zeros(SIZE, bool)
    mask[32:96, 64:192] = True
    a, b, c = picture(4, SIZE), picture(4, SIZE), picture(4, SIZE)
    b[mask] = 255 - b[mask]  # differs only under the mask
    c[~mask] = 255 - c[~mask]  # differs only outside it
    out = [run(pipe, "a cat", control_image=x, mask_image=mask) for x in (a, b, c)]
    assert rel_err(out[1], out[0]) == 0.0
    assert rel_err(out[2], out[0]) > 1e-4
    with pytest.raises(ValueError, match="mask_image"):
        pipe("a cat", control_image=a, **KW)
    pipe.load_controlnet(None)


def test_bad_control_arguments(sc):
    _, pipe = sc
    with pytest.raises(ValueError, match="needs a ControlNet"):
        pipe("a", control_image=picture(0), **KW)
    pipe.load_controlnet(controlnet(CANNY, False))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        pipe("a", control_image=picture(0), controlnet_conditioning_scale=-1, **KW)
    with pytest.raises(ValueError, match="only for an inpaint"):
        pipe("a", control_image=picture(0), mask_image=np.ones(SIZE, bool), **KW)
    with pytest.raises(ValueError, match="1 \\(shared\\) or 2"):
        pipe(["a", "b"], control_image=np.stack([picture(0)] * 3), **KW)
    pipe.load_controlnet(None)


@pytest.fixture(scope="module")
def converted(sc, tmp_path_factory):
    """Tiny Canny and inpainting ControlNets as original-layout safetensors files, converted by `wurst-jax convert`;
    a control image and masks."""
    tmp = tmp_path_factory.mktemp("cn")
    for name, cfg in (("canny", CANNY), ("inpaint", INPAINT)):
        module, variables = controlnet(cfg, True)
        (file,) = wj.export_component(module, variables, tmp / f"export-{name}").glob("*.safetensors")
        config = {"c_in": cfg.c_in, "c_proj": 16, "proj_blocks": [0, 5], "effnet": "tiny", "c_embd": 48}
        args = ["convert", str(file), str(tmp / name), "--stage", "controlnet", "--config", json.dumps(config)]
        assert main([*args, "--quiet"]) == 0
    Image.fromarray(picture(0)).save(tmp / "edges.png")
    Image.fromarray(np.where(np.arange(96)[:, None] < 48, 255, 0).astype(np.uint8).repeat(192, 1)).save(tmp / "m.png")
    Image.fromarray(picture(5, SIZE)).save(tmp / "photo.png")  # at the output size: kept pixel for pixel
    mask = np.zeros(SIZE, np.uint8)
    mask[32:96, 64:192] = 255
    Image.fromarray(mask).save(tmp / "hole.png")
    return tmp


@pytest.mark.parametrize("kind", ["canny", "inpaint"])
def test_cli_generates_with_a_converted_controlnet(sc, converted, tmp_path, kind):
    """End to end; inpainting (the default --keep-unmasked) returns the control image's unmasked pixels exactly
    (tolerance 0 after decoding) and generated ones under the mask."""
    root, _ = sc
    out = tmp_path / "cn.png"
    image = "photo.png" if kind == "inpaint" else "edges.png"
    argv = ["generate", "a red cube", "--model", str(root / "stable-cascade"), "--prior",
            str(root / "stable-cascade-prior"), "--control", kind, "--controlnet", str(converted / kind),
            "--control-image", str(converted / image), "--control-scale", "0.8", "--height", "128", "--width",
            "256", "--prior-steps", "2", "--steps", "2", "--dtype", "float32", "--quiet",
            "--out", str(out)]  # fmt: skip
    argv += ["--mask", str(converted / "hole.png")] if kind == "inpaint" else []
    assert main(argv) == 0
    with Image.open(out) as result:
        assert result.size == (256, 128)
        got = np.asarray(result.convert("RGB"))
    if kind == "inpaint":
        photo, hole = np.asarray(Image.open(converted / "photo.png")), np.asarray(Image.open(converted / "hole.png"))
        kept = hole < 128
        np.testing.assert_array_equal(got[kept], photo[kept])
        assert np.abs(got[~kept].astype(int) - photo[~kept]).mean() > 5  # generated, not copied


def test_keep_unmasked_resizes_the_control_image_and_mask_to_the_output():
    from wurst_jax.cli.control import keep_unmasked

    photo, generated = picture(7, (48, 96)), [Image.fromarray(picture(8)), Image.fromarray(picture(9))]
    mask = np.zeros((48, 96), np.uint8)
    mask[:, 48:] = 255  # the right half is generated
    call = {"control_image": Image.fromarray(photo), "mask_image": Image.fromarray(mask)}
    out = [np.asarray(i) for i in keep_unmasked(generated, call)]
    bigger = np.asarray(Image.fromarray(photo).resize((192, 96), Image.BICUBIC))
    for o, g in zip(out, generated, strict=True):
        assert o.shape == (96, 192, 3)
        np.testing.assert_array_equal(o[:, :96], bigger[:, :96])
        np.testing.assert_array_equal(o[:, 96:], np.asarray(g)[:, 96:])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--control", "canny", "--controlnet", "{cn}"], "--control-image"),
        (["--control", "canny", "--control-image", "{img}"], "--controlnet"),
        (["--controlnet", "{cn}", "--control-image", "{img}"], "--controlnet needs --control"),
        (["--control", "canny", "--controlnet", "{cn}", "--control-image", "{img}", "--mask", "{mask}"], "--mask"),
        (
            ["--control", "canny", "--controlnet", "{cn}", "--control-image", "{img}", "--no-keep-unmasked"],
            "--keep-unmasked is for --control inpaint",
        ),
        (["--control", "inpaint", "--controlnet", "{cn}", "--control-image", "{img}"], "--mask"),
        (["--control", "canny", "--controlnet", "{cn}", "--control-image", "nowhere.png"], "--control-image"),
        (["--control", "canny", "--controlnet", "nowhere", "--control-image", "{img}"], "--controlnet nowhere"),
        (["--control", "canny", "--controlnet", "{cn}", "--control-image", "{img}", "--control-scale", "-1"], "scale"),
        (["--control", "sr", "--controlnet", "{cn}", "--control-image", "{img}"], "sr"),
        (["--v2", "--control", "canny", "--controlnet", "{cn}", "--control-image", "{img}"], "Stable Cascade"),
    ],
)
def test_cli_bad_control_flags_exit_2(sc, converted, tmp_path, capsys, flags, message):
    root, _ = sc
    names = {
        "{cn}": str(converted / "canny"),
        "{img}": str(converted / "edges.png"),
        "{mask}": str(converted / "m.png"),
    }
    flags = [names.get(f, f) for f in flags]
    model = (
        []
        if flags[0] == "--v2"
        else ["--model", str(root / "stable-cascade"), "--prior", str(root / "stable-cascade-prior")]
    )
    argv = ["generate", "a", *model, *flags[flags[0] == "--v2" :], "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
