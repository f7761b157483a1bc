"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) from open_clip's `bpe_simple_vocab_16e6.txt.gz`,
exactly as open_clip / OpenAI CLIP construct their vocabulary (49,408 tokens)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def open_clip_bpe() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed: `pip install --no-deps open-clip-torch` ships the BPE file"
        )
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(folder: str | Path, bpe: str | Path | None = None):
    """Write a transformers `CLIPTokenizer` (77 tokens) to `folder` and return it."""
    from transformers import CLIPTokenizer

    merges = gzip.open(bpe or open_clip_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok
