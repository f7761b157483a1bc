"""`wurst-jax generate` on tiny Stable Cascade folders: the generation read off model_index.json, text-to-image and
image variation (`--image`, repeatable), and bad input as one message with exit status 2."""

import numpy as np
import pytest
from cascade_checkpoints import build
from PIL import Image
from test_cli import run_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc_cli")
    build(root)
    return root / "stable-cascade", root / "stable-cascade-prior"


def test_generate_variation(folders, tmp_path):
    decoder, prior = folders
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30, 3), (25, 50, 3)]):
        Image.fromarray(rng.integers(0, 256, size, np.uint8)).save(tmp_path / f"in{i}.png")
    res = run_cli(
        "generate", "a red circle", "--model", str(decoder), "--prior", str(prior), "--height", "128", "--width",
        "256", "--prior-steps", "2", "--steps", "2", "--dtype", "float32", "--seed", "3", "--num-images", "2",
        "--image", str(tmp_path / "in0.png"), "--image", str(tmp_path / "in1.png"), "--out", str(tmp_path / "v.png"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(tmp_path / "v_0.png"), str(tmp_path / "v_1.png")]
    assert "image_encoder: compiled" in res.stderr  # the images were encoded
    assert "2 steps × 2 images + CFG, latent 3×6" in res.stderr  # the Stable Cascade prior ran, guided
    with Image.open(tmp_path / "v_0.png") as img:
        assert img.size == (256, 128) and img.mode == "RGB"


def test_generate_bad_input(folders, tmp_path):
    decoder, prior = folders
    common = ["--model", str(decoder), "--prior", str(prior), "--prior-steps", "1", "--steps", "1"]
    res = run_cli("generate", "x", *common, "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "a.png"))
    assert res.returncode == 2 and "--image" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("generate", "x", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "a.png"))
    assert res.returncode == 2 and "--image needs --effnet" in res.stderr  # v2 variation needs the EfficientNet
    res = run_cli("generate", "x", *common, "--height", "64", "--width", "64", "--out", str(tmp_path / "a.png"))
    assert (
        res.returncode == 2
        and "--height 64: not a size this model can make" in res.stderr
        and not (tmp_path / "a.png").exists()
    )


def test_help_states_both_generations_defaults():
    res = run_cli("generate", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "Stable Cascade 20" in text and "Stable Cascade 10" in text and "v2 12" in text
