"""`wurst-jax generate` writes real PNG files of the requested size from a tiny checkpoint."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image


def run_cli(*args, devices=1):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "wurst_jax.cli", *args], capture_output=True, text=True, env=env)


def test_generate_writes_numbered_pngs(tiny_checkpoints, tmp_path):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    out = tmp_path / "pics" / "cat.png"
    res = run_cli(
        "generate",
        "a red circle on a blue background",
        "--model",
        str(decoder_dir),
        "--prior",
        str(prior_dir),
        "--out",
        str(out),
        "--height",
        "128",
        "--width",
        "256",
        "--prior-steps",
        "3",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--dtype",
        "float32",
        "--seed",
        "5",
    )
    assert res.returncode == 0, res.stderr
    paths = [tmp_path / "pics" / "cat_0.png", tmp_path / "pics" / "cat_1.png"]
    assert res.stdout.split() == [str(p) for p in paths]
    assert "prior: compiled in" in res.stderr and "decoder:" in res.stderr  # progress for a person
    for p in paths:
        with Image.open(p) as img:
            img.verify()
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (256, 128) and img.mode == "RGB"


def test_generate_bad_input_exits_nonzero_with_a_message(tiny_checkpoints, tmp_path):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    common = ["--model", str(decoder_dir), "--prior", str(prior_dir), "--prior-steps", "2", "--steps", "2"]
    res = run_cli("generate", "x", *common, "--out", str(tmp_path / "a.png"), "--height", "150")
    assert res.returncode == 2 and "multiple of 16" in res.stderr and not (tmp_path / "a.png").exists()
    res = run_cli("generate", "x", *common, "--out", str(tmp_path / "a.jpg"))
    assert res.returncode != 0 and ".png" in res.stderr
    res = run_cli("generate", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "a.png"))
    assert res.returncode == 2 and "no such folder" in res.stderr


def test_generate_sharded_matches_unsharded(tiny_checkpoints, tmp_path):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    common = [
        "a red circle",
        "--model",
        str(decoder_dir),
        "--prior",
        str(prior_dir),
        "--height",
        "128",
        "--width",
        "128",
        "--prior-steps",
        "2",
        "--steps",
        "2",
        "--dtype",
        "float32",
        "--num-images",
        "3",
    ]
    assert run_cli("generate", *common, "--out", str(tmp_path / "one.png")).returncode == 0
    res = run_cli(
        "generate", *common, "--out", str(tmp_path / "many.png"), "--sharding", "tp", "--model-axis", "2", devices=4
    )
    assert res.returncode == 0, res.stderr
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / f"one_{i}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / f"many_{i}.png"), np.int16)
        assert np.abs(a - b).max() <= 1  # 8-bit rounding of images equal to ~1e-5


def test_generate_with_the_shipped_tiny_model(tmp_path):
    out = tmp_path / "default.png"
    res = run_cli("generate", "a red circle on a blue background", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    with Image.open(out) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        pixels = np.asarray(img, np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert border.mean(0)[2] > 150 and border.mean(0)[0] < 100  # a blue background, as asked


def test_model_defaults_come_from_model_index(tmp_path):
    from wurst_jax.cli.generate import model_defaults
    from wurst_jax.serving.backend import TINY_MODEL

    assert model_defaults(tmp_path) == (1024, 0.0)  # no model_index.json: v2's size, diffusers' guidance off
    (tmp_path / "model_index.json").write_text('{"default_size": 128, "default_decoder_guidance": 2.5}')
    assert model_defaults(tmp_path) == (128, 2.5)
    size, guidance = model_defaults(TINY_MODEL / "wuerstchen")
    assert size == 64 and guidance >= 0
