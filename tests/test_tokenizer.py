"""`pipelines/tokenizer.py` against transformers' CLIPTokenizer on the shipped CLIP vocabulary (49,408 tokens), from
vocab.json + merges.txt and from a saved tokenizer.json: the same ids and masks on every padding / truncation mode the
pipelines use, long prompts truncated keeping EOS, the same decoded text, and no transformers import."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wurst_jax.pipelines.tokenizer import ClipTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "wurst_jax" / "assets" / "tiny" / "wuerstchen" / "tokenizer"
LONG = " ".join(f"word{i} and a red circle, on blue!" for i in range(30))  # ~250 tokens: truncated to 77
PROMPTS = [
    "a red circle on a blue background",
    "",
    "A PHOTO of a Cat's  hat,\tdon't   you'll  see",
    "naïve café — ünïcödé ✨ emoji 🐱 日本語 テキスト",
    "numbers 1234567 and 3.14159, punctuation!!! ??? ...",
    "<|startoftext|>special tokens<|endoftext|> inside",
    "(red)1.3 circle++ and [blue:0.5]",
    LONG,
    "x" * 300,
]


@pytest.fixture(scope="module")
def reference():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(FOLDER))


@pytest.fixture(scope="module", params=["vocab+merges", "tokenizer.json"])
def ours(request, reference, tmp_path_factory):
    if request.param == "vocab+merges":
        return load_tokenizer(FOLDER)
    folder = tmp_path_factory.mktemp("tok")
    reference.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    return load_tokenizer(folder)


def test_is_ours(ours, reference):
    assert isinstance(ours, ClipTokenizer)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "model_max_length"):
        assert getattr(ours, k) == getattr(reference, k), k


@pytest.mark.parametrize(
    "kw",
    [
        dict(padding="max_length", max_length=77, truncation=True, return_tensors="np"),
        dict(padding="longest", return_tensors="np"),
        dict(padding="max_length", max_length=10, truncation=True, return_tensors="np"),
    ],
)
def test_batch_ids_equal(ours, reference, kw):
    got, want = ours(PROMPTS, **kw), reference(PROMPTS, **kw)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.attention_mask, want.attention_mask)


def test_truncation_keeps_eos(ours):
    ids = ours([LONG], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == ours.bos_token_id and ids[0, -1] == ours.eos_token_id


def test_single_and_decode(ours, reference):
    for p in PROMPTS:
        assert ours(p, add_special_tokens=False).input_ids == reference(p, add_special_tokens=False).input_ids
        ids = reference(p).input_ids
        assert ours.decode(ids) == reference.decode(ids)
    rows = reference(PROMPTS, padding="longest", return_tensors="np").input_ids
    assert ours.batch_decode(rows[:, 3:9]) == reference.batch_decode(rows[:, 3:9])


def test_no_transformers_import():
    code = f"import sys; from wurst_jax.pipelines.tokenizer import load_tokenizer; load_tokenizer({str(FOLDER)!r})"
    code += "; print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
