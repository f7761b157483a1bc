"""What issue 17 left of the Stable Cascade ControlNet: the super-resolution ControlNet in the pipelines and the
CLI (the EfficientNet encoder inside the pipeline), the original's stage C schedule `shift` (against a small
re-implementation of its GDF code), and `wurst-jax train --stage c-controlnet` (a few steps lower the loss on fixed
draws, stage C stays bit-equal, a resumed run is bit-identical, bad keys exit 2 in one line)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cascade_checkpoints import build
from conftest import rel_err, torch_effnet
from PIL import Image

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.controlnet import stage_c
from wurst_jax.models.cascade import ControlNetConfig, StableCascadeControlNet
from wurst_jax.models.effnet import EfficientNetConfig
from wurst_jax.samplers import DDPMWuerstchen, denoise_loop

SIZE = (128, 256)
KW = dict(height=SIZE[0], width=SIZE[1], num_inference_steps=3, seed=3)
# tiny_prior's 16-channel ResBlocks are ordinals 0 and 5; the sr ControlNet takes the 16-channel embedding
SR = ControlNetConfig(c_in=16, c_proj=16, proj_blocks=(0, 5), bottleneck_mode="simple")
EFFNET = EfficientNetConfig(c_latent=16, c_cond=48, effnet="tiny", mapper_affine=False)


def randomized(module, x, seed=1, scale=0.2):
    """(module, its variables with noise on every parameter), made in one jit (op by op is slow)."""

    def make():
        variables = module.init(jax.random.key(seed), x)
        leaves, tree = jax.tree_util.tree_flatten(variables["params"])
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
        return {**variables, "params": jax.tree_util.tree_unflatten(tree, noisy)}

    return module, jax.jit(make)()


def picture(seed, size=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    """The tiny Stable Cascade folders, their prior pipeline, and an sr ControlNet + EfficientNet encoder saved
    as folders (the ControlNet in the original file layout, converted by `wurst-jax convert`)."""
    root = tmp_path_factory.mktemp("sc")
    build(root)
    pipe = wj.StableCascadePriorPipeline.from_pretrained(root / "stable-cascade-prior", progress=False)
    cn = randomized(StableCascadeControlNet(SR), jnp.zeros((1, 8, 8, 16)))
    torch_effnet(EFFNET, seed=3).save_pretrained(root / "effnet")  # torch's init: flax's is slow on the CPU
    eff = wj.load_component(root / "effnet")
    (file,) = wj.export_component(*cn, root / "export").glob("*.safetensors")
    config = json.dumps(dataclasses.asdict(SR))
    assert main(["convert", str(file), str(root / "sr"), "--stage", "controlnet", "--config", config, "--quiet"]) == 0
    Image.fromarray(picture(0)).save(root / "low.png")
    return root, pipe, cn, eff


# ---------------------------------------------------------------- super-resolution


def test_sr_condition_is_nearest_half_effnet_nearest_double_and_drives_the_prior(sc):
    root, pipe, cn, eff = sc
    with pytest.raises(ValueError, match="effnet"):
        pipe.load_controlnet(cn)
    plain = pipe("a cat", **KW).image_embeddings
    pipe.load_controlnet(str(root / "sr"), effnet=str(root / "effnet"))
    assert pipe.controller.kind == "sr"
    img = picture(1)
    # the original's SREffnetFilter written out: nearest ½ (every other pixel), ImageNet normalisation, the
    # encoder, nearest ×2 (each value twice along both axes)
    x = (img.astype(np.float32) / 255)[None, ::2, ::2]
    x = (x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    emb = np.asarray(jax.jit(eff[0].apply)(eff[1], jnp.asarray(x)), np.float32)
    want_cond = emb.repeat(2, axis=1).repeat(2, axis=2)
    got_cond = pipe.controller.condition(img)
    assert got_cond.shape == (1, SIZE[0] // 32, SIZE[1] // 32, 16)
    assert rel_err(got_cond, want_cond) < 1e-5
    got = pipe._control(2, img, 0.7, None)
    want = stage_c.compute_control(*cn, want_cond, 0.7)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert rel_err(g, np.repeat(np.asarray(w), 2, 0)) < 1e-5
    out = pipe("a cat", control_image=Image.fromarray(img), **KW).image_embeddings
    print(f"sr ControlNet vs none: rel err {rel_err(out, plain):.2e}")
    assert rel_err(out, plain) > 1e-3
    pipe.load_controlnet(None)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--control", "sr", "--controlnet", "{cn}", "--control-image", "{img}"], "--control sr needs --effnet"),
        (["--control", "sr", "--controlnet", "{cn}", "--control-image", "{img}", "--effnet", "nowhere"], "nowhere"),
        (["--effnet", "{eff}"], "--effnet is used only with"),
        (
            [
                "--control",
                "sr",
                "--controlnet",
                "{cn}",
                "--control-image",
                "{img}",
                "--effnet",
                "{eff}",
                "--shift",
                "0",
            ],
            "--shift",
        ),  # fmt: skip
        (["--v2", "--shift", "2"], "--shift"),
    ],
)
def test_cli_bad_sr_and_shift_flags_exit_2(sc, tmp_path, capsys, flags, message):
    root = sc[0]
    names = {"{cn}": str(root / "sr"), "{img}": str(root / "low.png"), "{eff}": str(root / "effnet")}
    flags = [names.get(f, f) for f in flags]
    model = [] if flags[0] == "--v2" else ["--model", str(root / "stable-cascade"), "--prior"]
    model += [] if flags[0] == "--v2" else [str(root / "stable-cascade-prior")]
    argv = ["generate", "a", *model, *flags[flags[0] == "--v2" :], "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_sr_and_shift_flags_reach_the_pipeline(sc):
    """The flags as `generate` hands them to from_pretrained and the call (the run itself is the pipeline's, above;
    a full CLI run with a ControlNet is tests/test_controlnet_pipeline.py's)."""
    import argparse

    from wurst_jax.cli.control import add_control_arguments, control_options

    root = sc[0]
    p = argparse.ArgumentParser()
    add_control_arguments(p)
    p.add_argument("--effnet")  # generate's flag, shared with image-to-image
    p.add_argument("--prompts")
    p.add_argument("--out-dir")
    flags = ["--control", "sr", "--controlnet", str(root / "sr"), "--effnet", str(root / "effnet"), "--shift", "2",
             "--control-image", str(root / "low.png")]  # fmt: skip
    load, call = control_options(p.parse_args(flags), cascade=True)
    assert load == {"controlnet": str(root / "sr"), "control_type": "sr", "effnet": str(root / "effnet")}
    assert call["prior_shift"] == 2.0 and call["controlnet_conditioning_scale"] == 1.0
    assert np.array_equal(np.asarray(call["control_image"]), picture(0))
    assert control_options(p.parse_args(["--shift", "1.5"]), cascade=True) == ({}, {"prior_shift": 1.5})


# ---------------------------------------------------------------- shift


class GDF:
    """The original's stage C sampling (gdf/: CosineSchedule with its limits, VPScaler, EpsilonTarget,
    CosineTNoiseCond, DDPMSampler) re-implemented from the source in torch float32, for one `shift`."""

    def __init__(self, s=0.008):
        self.s = torch.tensor([s])
        self.min_var = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2
        self.limits = self.log_snr(torch.tensor([1.0, 0.0]), 1).tolist()  # reset_limits: unshifted, [min, max]

    def log_snr(self, t, shift):
        var = torch.cos((self.s + t) / (1 + self.s) * torch.pi * 0.5).clamp(0, 1) ** 2 / self.min_var
        log_snr = (var.clamp(0.0001, 0.9999) / (1 - var.clamp(0.0001, 0.9999))).log()
        if shift != 1:
            log_snr += 2 * np.log(1 / shift)
        return log_snr if not hasattr(self, "limits") else log_snr.clamp(*self.limits)

    def noise_cond(self, log_snr):
        var = log_snr.sigmoid().clamp(0, 1)
        return ((var * self.min_var) ** 0.5).acos() / (torch.pi * 0.5) * (1 + self.s) - self.s

    def sample(self, model, x, noises, steps, shift):
        log_snrs = self.log_snr(torch.linspace(1.0, 0.0, steps + 1), shift)
        rs = []
        for i in range(steps):
            r = self.noise_cond(log_snrs[i]).expand(x.shape[0])
            rs.append(r[0].item())
            pred = model(x, r)
            a, b = log_snrs[i].sigmoid().sqrt(), (1 - log_snrs[i].sigmoid()).sqrt()
            a_prev, b_prev = log_snrs[i + 1].sigmoid().sqrt(), (1 - log_snrs[i + 1].sigmoid()).sqrt()
            x0 = (x - pred * b) / a
            sigma = (b_prev**2 / b**2).sqrt() * (1 - a**2 / a_prev**2).sqrt()  # eta 1
            x = a_prev * x0 + (b_prev**2 - sigma**2).sqrt() * pred + sigma * noises[i]
        return x, rs


def test_shift_follows_the_original_gdf_and_shift_1_is_todays_schedule():
    steps, shape = 6, (2, 3, 4, 16)
    rng = np.random.default_rng(0)
    x, noises = rng.standard_normal(shape, np.float32), rng.standard_normal((steps, *shape), np.float32)
    w = rng.standard_normal(16).astype(np.float32) * 0.3

    def torch_model(x, r):  # an ε "model" that depends on x and on the noise ratio it is given
        return 0.5 * torch.tanh(x * torch.from_numpy(w)) + r[:, None, None, None]

    def jax_model(x, r, _):
        return 0.5 * jnp.tanh(x * w) + r[:, None, None, None]

    sampler = DDPMWuerstchen()
    for shift in (2.0, 3.5):
        want, want_r = GDF().sample(torch_model, torch.from_numpy(x), torch.from_numpy(noises), steps, shift)
        ts = sampler.timesteps(steps, shift=shift)
        np.testing.assert_allclose(ts[:-1], want_r, rtol=0, atol=2e-6)
        got = jax.jit(lambda ts, x, n: denoise_loop(jax_model, None, sampler, ts, x, n))(ts, x, noises)
        print(f"shift {shift}: t' {np.round(ts, 4)}, rel err vs GDF {rel_err(got, want.numpy()):.2e}")
        assert rel_err(got, want.numpy()) < 1e-5
    # shift 1: the schedule as it was, bit for bit, whichever way it is asked for
    asks = ({"num_inference_steps": 5}, {"timesteps": [1.0, 0.7, 0.3, 0.0]}, {"num_inference_steps": 4, "t_start": 0.6})
    for kw in asks:
        np.testing.assert_array_equal(sampler.timesteps(**kw, shift=1.0), sampler.timesteps(**kw))
    with pytest.raises(ValueError, match="shift"):
        sampler.timesteps(4, shift=0.0)


def test_prior_pipeline_shift(sc):
    """shift=1 is bit-equal to no shift; another shift changes the latents through the same compiled loop."""
    _, pipe, _, _ = sc
    plain = pipe("a dog", **KW).image_embeddings
    compiles = sum(1 for key in pipe.compiler._executables if key[0] == "prior")
    np.testing.assert_array_equal(pipe("a dog", shift=1.0, **KW).image_embeddings, plain)
    shifted = pipe("a dog", shift=2.0, **KW).image_embeddings
    assert rel_err(shifted, plain) > 1e-3
    assert sum(1 for key in pipe.compiler._executables if key[0] == "prior") == compiles


# ---------------------------------------------------------------- training


def shards(folder, n=4, size=64, grid=4):
    """One shard of n samples: block pictures (edges for Canny), captions and stage C latents."""
    rng = np.random.default_rng(5)
    images = np.zeros((n, size, size, 3), np.uint8)
    for img in images:
        for _ in range(3):
            y, x = rng.integers(0, size // 2, 2)
            img[y : y + size // 2, x : x + size // 3] = rng.integers(0, 256, 3)
    folder.mkdir()
    np.savez(
        folder / "shard-00000.npz",
        captions=np.array([f"shape {i}" for i in range(n)]),
        image_embeddings=rng.standard_normal((n, grid, grid, 16)).astype(np.float32),
        images=images,
    )
    return folder


MODEL = {"c_proj": 16, "proj_blocks": [0, 5], "bottleneck_mode": "simple"}  # the cheapest to compile


def train_config(root, tmp, **over):
    cfg = {"out": str(tmp / "run"), "init": str(root / "stable-cascade-prior"), "data": str(tmp / "data"),
           "steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "ema_decay": 0.0, "cond_dropout": 0.0,
           "log_every": 1, "ckpt_every": 1, "controlnet": {"filter": "inpaint", "model": MODEL, "offset_noise": 0.0,
                                                            "stage_c_dropout": False}}  # fmt: skip
    cfg.update(over)
    (tmp / "cn.json").write_text(json.dumps(cfg))
    return tmp / "cn.json"


def test_train_c_controlnet_lowers_the_loss_keeps_stage_c_and_resumes_bit_identically(sc, tmp_path):
    from transformers import AutoTokenizer

    from wurst_jax.controlnet import train as cn_train
    from wurst_jax.controlnet.training import controlnet_loss
    from wurst_jax.pipelines.prompts import caption_tokens
    from wurst_jax.pipelines.runtime import use_compilation_cache
    from wurst_jax.train.config import finetune_config, read_config

    root = sc[0]
    data = shards(tmp_path / "data")
    path = train_config(root, tmp_path)
    cfg = finetune_config(read_config(path), "c-controlnet", str(path))
    use_compilation_cache(tmp_path / "cache")
    folder, state = cn_train.train_controlnet(cfg, log=lambda _: None)
    unet, unet_vars = wj.load_component(root / "stable-cascade-prior" / "prior")
    for p, leaf in jax.tree_util.tree_leaves_with_path(state.frozen["stage_c"]):  # stage C: never updated
        want = unet_vars["params"]
        for k in p:
            want = want[k.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))

    # the loss on fixed draws (16 keys, all samples), the fresh ControlNet against the trained one (ema_decay 0:
    # the export is the trained weights)
    text, text_vars = wj.load_component(root / "stable-cascade-prior" / "text_encoder")
    tok = AutoTokenizer.from_pretrained(str(root / "stable-cascade-prior" / "tokenizer"))
    raw = dict(np.load(data / "shard-00000.npz"))
    ids, mask = caption_tokens(tok, list(raw["captions"]))
    host = {"ids": ids, "mask": mask, "latents": raw["image_embeddings"], "condition": cn_train.host_condition(
        "inpaint", raw["images"], 0, 0, 0.4)}  # fmt: skip
    batch = cn_train.prepare_fn("inpaint", text, None)({"text_encoder": text_vars}, host)
    fresh, fresh_vars = cn_train.new_controlnet(cfg.controlnet.model, 0)
    trained, trained_vars = wj.load_component(folder)
    assert trained.config == fresh.config

    def mean_loss(cn_vars):
        loss = controlnet_loss(unet, fresh, stage_c_dropout=False)
        params = {"controlnet": cn_vars["params"], "stage_c": unet_vars["params"]}
        keys = jax.random.split(jax.random.key(7), 16)
        stats = {"controlnet": cn_vars["batch_stats"]} if cn_vars.get("batch_stats") else None
        return jnp.mean(jax.vmap(lambda k: loss(params, stats, k, batch)[0])(keys))

    mean_loss = jax.jit(mean_loss)
    before, after = float(mean_loss(fresh_vars)), float(mean_loss(trained_vars))
    print(f"c-controlnet: loss on fixed draws {before:.6f} -> {after:.6f} in 4 steps (the first at lr 0)")
    assert after < before

    # resume: drop the last checkpoint and the export; the CLI resumes at step 3 and ends where the run ended (the
    # persistent compilation cache of the first run spares the CLI its compile)
    exported = {f.name: f.read_bytes() for f in folder.iterdir()}
    shutil.rmtree(tmp_path / "run" / "ckpt_c-controlnet" / "4")
    shutil.rmtree(folder)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--stage", "c-controlnet", "--config", str(path), *cache]) == 0
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == exported


@pytest.mark.parametrize(
    "over, message",
    [
        ({"controlnet": {"filter": "hed"}}, "'filter' must be"),
        ({"controlnet": {"filter": "canny", "colour": 1}}, "unknown keys ['colour']"),
        ({"controlnet": {"filter": "sr"}}, "needs 'effnet'"),
        ({"controlnet": {"filter": "canny", "model": {"c_in": 3}}}, "'controlnet.model.c_in' must be 1"),
        ({"controlnet": {"filter": "canny", "model": {"c_proj": "wide"}}}, "'controlnet.model.c_proj'"),
        ({"controlnet": {"filter": "canny", "offset_noise": -1}}, "'offset_noise' must be"),
        ({"controlnet": "canny"}, "must be an object"),
        ({"controlnet": {"filter": "canny"}, "lora_rank": 4}, "lora_rank"),
        ({"controlnet": None}, "must be an object"),
        ({"steps": 0}, "'steps' must be"),
    ],
)
def test_train_c_controlnet_bad_config_exits_2_in_one_line(tmp_path, capsys, over, message):
    path = train_config(tmp_path, tmp_path, **over)
    assert main(["train", "--stage", "c-controlnet", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
