"""The CLIP tokenizer on the `tokenizers` library alone: the ids of transformers' `CLIPTokenizer` without importing
transformers (whose import pulls in torch: seconds of a command's start-up for a wrapper around the same Rust BPE).

`load_tokenizer(folder)` reads a `tokenizer/` folder: `tokenizer.json` when present, else CLIP's `vocab.json` +
`merges.txt` with the normalisation and pre-tokenisation `CLIPTokenizer` sets up; any other tokenizer class falls
back to transformers' `AutoTokenizer`. `ClipTokenizer` answers the calls the pipelines make (`__call__` with
padding / truncation, `decode`, `batch_decode`, the special-token ids, `model_max_length`).
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path
from typing import Any

import numpy as np

_BUILT: dict[bytes, ClipTokenizer] = {}  # sha256 of a folder's files → its tokenizer (see `load_tokenizer`)
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token(value: Any, default: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return default if value is None else str(value)


class ClipTokenizer:
    """BPE ids as transformers' CLIPTokenizer gives them: BOS + text tokens + EOS, truncated to `max_length` keeping
    both special tokens, padded with the pad token (attention mask 0 there)."""

    def __init__(self, backend: Any, config: dict):
        self.backend = backend
        self.model_max_length = int(config.get("model_max_length") or 77)
        if self.model_max_length > 10**6:  # transformers' "no limit" sentinel
            self.model_max_length = 77
        names = {k: _token(config.get(f"{k}_token"), "<|endoftext|>") for k in ("unk", "eos", "pad")}
        names["bos"] = _token(config.get("bos_token"), "<|startoftext|>")
        for k, name in names.items():
            token_id = backend.token_to_id(name)
            if token_id is None:
                raise ValueError(f"tokenizer: special token {name!r} ({k}_token) is not in the vocabulary")
            setattr(self, f"{k}_token_id", token_id)
        self._suffix = getattr(backend.model, "end_of_word_suffix", None) or ""

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else list(ids)

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        **_: Any,
    ) -> Any:
        single = isinstance(text, str)
        rows = [self._ids(t, add_special_tokens) for t in ([text] if single else text)]
        if truncation:
            n = max_length or self.model_max_length
            tail = [self.eos_token_id] if add_special_tokens else []
            rows = [r if len(r) <= n else r[: n - len(tail)] + tail for r in rows]
        if padding in (True, "longest", "max_length") and rows:
            n = (max_length or self.model_max_length) if padding == "max_length" else max(map(len, rows))
            masks = [[1] * len(r) + [0] * (n - len(r)) for r in rows]
            rows = [r + [self.pad_token_id] * (n - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors == "np":
            ids, mask = np.asarray(rows, np.int64), np.asarray(masks, np.int64)
        elif single:
            ids, mask = rows[0], masks[0]
        else:
            ids, mask = rows, masks
        return types.SimpleNamespace(input_ids=ids, attention_mask=mask)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(self._suffix, " ").strip() if self._suffix else text

    def batch_decode(self, rows: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def _clip_backend(folder: Path, config: dict, source: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if source == "tokenizer.json":
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        backend.no_padding()  # padding and truncation are `ClipTokenizer.__call__`'s, per call
        backend.no_truncation()
        return backend

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#version")]
    unk = _token(config.get("unk_token"), "<|endoftext|>")
    bpe = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [_token(config.get(f"{k}_token"), "<|endoftext|>") for k in ("unk", "eos", "pad")]
    tok.add_special_tokens(sorted({_token(config.get("bos_token"), "<|startoftext|>"), *specials}))
    return tok


def load_tokenizer(folder: str | Path) -> Any:
    """A pipeline's tokenizer from its `tokenizer/` folder, without transformers for CLIP (see the module note)."""
    folder = Path(folder)
    cfg_file = folder / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    cls = config.get("tokenizer_class", "CLIPTokenizer")
    if cls in ("CLIPTokenizer", "CLIPTokenizerFast"):
        files = [folder / "tokenizer.json"] if (folder / "tokenizer.json").is_file() else []
        if not files and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            files = [folder / "vocab.json", folder / "merges.txt"]
        if files:  # a prior and a decoder folder usually hold the same files: built once per process
            key = hashlib.sha256(b"\0".join(f.name.encode() + b"\0" + f.read_bytes() for f in files))
            key.update(json.dumps(config, sort_keys=True).encode())
            if key.digest() not in _BUILT:
                _BUILT[key.digest()] = ClipTokenizer(_clip_backend(folder, config, files[0].name), config)
            return _BUILT[key.digest()]
    from transformers import AutoTokenizer  # another tokenizer: transformers knows it

    return AutoTokenizer.from_pretrained(str(folder))
