"""`wurst-jax generate` writes real PNG files of the requested size from a tiny checkpoint."""

import os
import subprocess
import sys

from PIL import Image


def run_cli(*args):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
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
