"""Prompts → CLIP token ids, and prompt weighting in Compel's syntax.

Tokenization matches diffusers' Würstchen pipelines: pad to `model_max_length` (77), truncate, and warn with the
removed text when a prompt is too long. Weighting: `(a red car)1.3` weighs a fragment explicitly, `word+` /
`word++` / `(fragment)+` multiply by 1.1 per `+`, `word-` / `word--` by 0.9 per `-`. A token's hidden state
is then moved away from (w > 1) or towards (w < 1) the hidden state of the empty prompt at the same position:
`h_w = h_empty + w · (h - h_empty)`.
"""

from __future__ import annotations

import logging
import re

import numpy as np

log = logging.getLogger("wurst_jax")
_warned: set[str] = set()  # removed text already reported by `tokenize`

_GROUP = re.compile(r"\((?P<text>[^()]*)\)(?P<mark>[0-9]*\.?[0-9]+|\++|-+)?")
_WORD = re.compile(r"(?P<text>[^\s()]+?)(?P<mark>\++|-+)(?=[\s,.;:!?]|$)")


def _weight(mark: str | None, default: float = 1.0) -> float:
    if not mark:
        return default
    if mark[0] == "+":
        return 1.1 ** len(mark)
    if set(mark) == {"-"}:
        return 0.9 ** len(mark)
    return float(mark)


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments; text without markup gets weight 1."""
    out: list[tuple[str, float]] = []
    pos = 0
    while pos < len(prompt):
        if m := _GROUP.match(prompt, pos):
            text, w = m.group("text"), _weight(m.group("mark"), default=1.1)
        elif (m := _WORD.match(prompt, pos)) and (pos == 0 or not prompt[pos - 1].isalnum()):
            text, w = m.group("text"), _weight(m.group("mark"))
        else:
            m, text, w = None, prompt[pos], 1.0
        pos = m.end() if m else pos + 1
        if out and out[-1][1] == w:
            out[-1] = (out[-1][0] + text, w)
        elif text:
            out.append((text, w))
    return out


def has_weights(prompt: str) -> bool:
    return any(w != 1.0 for _, w in parse_weighted(prompt))


def strip_weights(prompt: str) -> str:
    """The prompt's text without weighting markup (`a (red)1.3 car` → `a red car`)."""
    return "".join(text for text, _ in parse_weighted(prompt))


def _ends(text: str, head: int = 48, tail: int = 24) -> str:
    """`text`, or its first and last characters around " … " when longer: a warning stays one short line."""
    return text if len(text) <= head + tail + 3 else f"{text[:head]} … {text[-tail:]}"


def tokenize(tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """prompts → (input_ids, attention_mask), both int32 [N, 77], warning when text is cut off."""
    n = tokenizer.model_max_length
    enc = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np")
    # verbose=False: the untruncated ids are only read for the warning below, never fed to the model (transformers
    # would warn of "indexing errors")
    full = tokenizer(prompts, padding="longest", return_tensors="np", verbose=False).input_ids
    if full.shape[-1] > n:
        removed = tokenizer.batch_decode(full[:, n - 1 : -1])
        # each cut-off text once: the prior's and the decoder's tokenizers see the same prompts, repeated per image
        removed = [r for r in dict.fromkeys(removed) if r and r not in _warned]
        if not removed:
            return enc.input_ids.astype(np.int32), enc.attention_mask.astype(np.int32)
        if len(_warned) > 1024:  # a long-running server: bounded memory
            _warned.clear()
        _warned.update(removed)
        cut = ", ".join(repr(_ends(r)) for r in removed[:3]) + (
            f" and {len(removed) - 3} more" if len(removed) > 3 else ""
        )
        log.warning(f"prompt truncated to CLIP's {n} tokens; cut off: {cut}")
    return enc.input_ids.astype(np.int32), enc.attention_mask.astype(np.int32)


def caption_tokens(tokenizer, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Training captions → (input_ids, attention_mask), int32 [N, 77]: `tokenize` without the truncation warning
    (a long caption is cut as the pipeline cuts a prompt; a data set would repeat the warning every batch)."""
    n = tokenizer.model_max_length  # 77 for CLIP
    enc = tokenizer(list(captions), padding="max_length", max_length=n, truncation=True, return_tensors="np")
    return enc.input_ids.astype(np.int32), enc.attention_mask.astype(np.int32)


def tokenize_weighted(tokenizer, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One weighted prompt → (input_ids [77], attention_mask [77], per-token weights [77] float32)."""
    n = tokenizer.model_max_length
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, w in parse_weighted(prompt):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [w] * len(piece)
    if len(ids) > n - 1:
        log.warning(f"weighted prompt truncated to {n} tokens; cut off: {_ends(tokenizer.decode(ids[n - 1 :]))!r}")
        ids, weights = ids[: n - 1], weights[: n - 1]
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    length = len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mask = [1] * length + [0] * (n - length)
    ids += [pad] * (n - length)
    weights += [1.0] * (n - length)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32), np.asarray(weights, np.float32)
