"""Bad `wurst-jax generate` input: exit 2, one error line naming the flag, no traceback, nothing loaded, nothing on
disk. The CLI runs in-process (`wurst_jax.cli.main`); every case fails before any weights load, so they are cheap."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wurst_jax.cli import main
from wurst_jax.cli import validate as V
from wurst_jax.serving.backend import TINY_MODEL


@pytest.fixture
def no_loading(monkeypatch):
    """Records any attempt to load a pipeline (none may happen for bad input)."""
    import wurst_jax as wj

    calls = []
    monkeypatch.setattr(wj.WuerstchenPipeline, "from_pretrained", classmethod(lambda cls, **kw: calls.append(kw)))
    return calls


def _folder(root: Path, parts: tuple[str, ...]) -> Path:
    """A copy of the shipped tiny decoder folder with only `parts` (config files only; weights are never read)."""
    root.mkdir()
    src = TINY_MODEL / "wuerstchen"
    shutil.copy(src / "model_index.json", root)
    for p in parts:
        (root / p).mkdir()
        if (src / p / "config.json").is_file():
            shutil.copy(src / p / "config.json", root / p)
    return root


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments after `generate`, the text the error line must contain)."""
    out = ["--out", str(tmp / "a.png")]
    empty = tmp / "empty"
    no_vqgan = _folder(tmp / "no_vqgan", ("decoder", "text_encoder", "tokenizer"))
    decoder_only = _folder(tmp / "decoder_only", ("decoder", "vqgan", "text_encoder", "tokenizer"))
    empty.mkdir()
    (tmp / "d.png").mkdir()
    return [
        (["x", *out, "--height", "0"], "--height 0: expected an integer from 1"),
        (["x", *out, "--height", "-64"], "--height -64"),
        (["x", *out, "--width", "100000"], "--width 100000: expected an integer from 1 to 16384"),
        (["x", *out, "--height", "40"], "--height 40: not a size this model can make (pixels / 8 "),
        (["x", *out, "--height", "8192", "--width", "8192"], "more than memory holds"),
        (["x", *out, "--steps", "0"], "--steps 0: expected an integer from 1"),
        (["x", *out, "--steps", "-3"], "--steps -3"),
        (["x", *out, "--prior-steps", "0"], "--prior-steps 0"),
        (["x", *out, "--num-images", "0"], "--num-images 0"),
        (["x", *out, "--batch-size", "0"], "--batch-size 0"),
        (["x", *out, "--prior-guidance", "nan"], "--prior-guidance nan"),
        (["x", *out, "--decoder-guidance", "-1"], "--decoder-guidance -1.0"),
        (["x", *out, "--model-axis", "0"], "--model-axis 0"),
        (["x", "--out", str(tmp / "x.jpg")], f"--out {tmp / 'x.jpg'}: expected a .png file name"),
        (["x", "--out", "/nonexistent/dir/x.png"], "--out /nonexistent/dir/x.png: folder /nonexistent does not exist"),
        (["x", "--out", str(tmp / "d.png")], "d.png: is a folder"),
        (["   ", *out], "PROMPT is empty"),
        ([*out], "give a PROMPT"),
        (["x", *out, "--prior", str(tmp)], "--prior needs --model"),
        (["x", *out, "--model", str(tmp / "typo")], "no such folder (only local folders are read"),
        (["x", *out, "--model", "org/typo"], "--model org/typo: no such folder"),
        (["x", *out, "--model", str(empty)], "missing decoder/, vqgan/, text_encoder/, tokenizer/"),
        (["x", *out, "--model", str(no_vqgan)], "missing vqgan/"),
        (["x", *out, "--model", str(decoder_only)], "has no prior_prior/ (not a combined folder): give the prior"),
        (["x", *out, "--model", str(decoder_only), "--prior", str(empty)], f"--prior {empty}: not a Würstchen prior"),
    ]


def test_bad_generate_arguments_fail_before_loading(tmp_path, capsys, no_loading):
    cases = _cases(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for argv, expected in cases:
        rc = main(["generate", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith("wurst-jax generate: error: "), (argv, err)
        assert expected in err[0], (argv, err[0])
    assert not no_loading  # every case failed before any weights load
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert not Path("/nonexistent").exists()


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("deep inside\nsecond line")

    monkeypatch.setattr("wurst_jax.cli.generate.check_generate", boom)
    assert main(["generate", "x", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "wurst-jax generate: error: RuntimeError: deep inside second line (run with --debug for the traceback)"
    )
    assert main(["generate", "x", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_size_hints_use_the_models_own_factor():
    tiny = V.ModelSpec.from_folders()
    with pytest.raises(ValueError, match=r"sizes that work: 16, 32, 48, 64, 80, 96, …"):
        V.check_size(tiny, "--height", 40)
    v2 = V.ModelSpec(decoder=Path("."), prior=None)
    with pytest.raises(ValueError, match=r"pixels / 42.67 .*sizes that work: 128, 256,"):
        V.check_size(v2, "--height", 150)
    V.check_size(v2, "--height", 1024)
    V.check_size(tiny, "--height", 64)


def test_num_images_is_split_into_bounded_batches(tmp_path, capsys, monkeypatch):
    """10,000 images never become one allocation: each pipeline call holds at most the batch limit, and image i
    gets seed + i whatever the batch size."""
    assert V.batches(10_000, 1024, 1024, None) == (4,) * 2500
    assert V.batches(5, 64, 64, 2) == (2, 2, 1)
    calls = []

    class FakePipe:
        def __call__(self, prompt, num_images_per_prompt, seed, height, width, **kw):
            calls.append((num_images_per_prompt, seed))
            images = [Image.fromarray(np.full((height, width, 3), s % 256, np.uint8)) for s in seed]

            class Out:
                pass

            Out.images = images
            return Out

    import wurst_jax as wj

    monkeypatch.setattr(wj.WuerstchenPipeline, "from_pretrained", classmethod(lambda cls, **kw: FakePipe()))
    rc = main(["generate", "a red circle on a blue background", "--out", str(tmp_path / "o.png"), "--quiet",
               "--num-images", "5", "--batch-size", "2", "--seed", "7"])  # fmt: skip
    assert rc == 0
    assert calls == [(2, [7, 8]), (2, [9, 10]), (1, [11])]
    for i in range(5):
        assert np.asarray(Image.open(tmp_path / f"o_{i}.png"))[0, 0, 0] == 7 + i


def test_tiny_model_warns_about_unknown_words_and_sizes(capsys):
    plan = V.GeneratePlan(str(TINY_MODEL / "wuerstchen"), None, V.ModelSpec.from_folders(), 128, 64, Path("a"), (1,))
    lines = V.tiny_warnings(plan, "a (purple)1.2 dog")
    assert lines[0].endswith("unknown: dog, purple")
    assert "expects a background colour" in lines[1]
    assert "trained at 64×64; 128×64" in lines[2]
    assert len(capsys.readouterr().err.strip().splitlines()) == 3
    ok = V.GeneratePlan(plan.model, None, plan.spec, 64, 64, Path("a"), (1,))
    assert V.tiny_warnings(ok, "two red circles at the left on a blue background") == []


def test_library_warnings_are_one_prefixed_line_and_a_long_prompt_is_quoted_short(tmp_path, capsys, monkeypatch):
    """The `wurst_jax` log's warnings reach stderr as `wurst-jax generate: warning: …` lines (one per warning, also
    after an earlier command in this process); a 500-word prompt's truncation quotes only the cut-off text's ends.
    Several batches are announced in one line."""
    import logging

    from wurst_jax.pipelines.prompts import tokenize
    from wurst_jax.pipelines.tokenizer import load_tokenizer

    class FakePipe:
        def __call__(self, prompt, num_images_per_prompt, seed, height, width, **kw):
            tokenize(load_tokenizer(TINY_MODEL / "wuerstchen" / "tokenizer"), [prompt])
            logging.getLogger("wurst_jax.test").warning("a second warning")

            class Out:
                images = [Image.fromarray(np.zeros((height, width, 3), np.uint8))] * num_images_per_prompt

            return Out

    import wurst_jax as wj

    monkeypatch.setattr(wj.WuerstchenPipeline, "from_pretrained", classmethod(lambda cls, **kw: FakePipe()))
    words = " ".join(f"word{i % 7}" for i in range(500))
    for run in range(2):
        argv = ["generate", f"a red circle on a blue background {words} end", "--out", str(tmp_path / f"o{run}.png")]
        assert main([*argv, "--num-images", "3", "--batch-size", "2"]) == 0
        lines = [ln for ln in capsys.readouterr().err.splitlines() if "tiny model" not in ln]
        assert lines[0] == "wurst-jax generate: 3 images in 2 batches of up to 2"
        warned = [ln for ln in lines if ln.startswith("wurst-jax generate: warning: ")]
        assert len(warned) == 3 - run  # the truncation once per process, then the other warning per batch
        if run == 0:
            assert "truncated to CLIP's 77 tokens" in warned[0] and warned[0].endswith(" end'")
            assert len(warned[0]) < 200
