"""Train tokens of original Stable Cascade LoRA files: the tokens its training added to the CLIP tokenizer.

The original (`train/train_c_lora.py`, config `train_tokens: [['[fernando]', '^dog</w>']]`) runs, per entry
(token, aggregation regex) whose token is `[...]` or `<...>`: `tokenizer.add_tokens([token])` (the next id), and
appends one row to the text encoder's token embedding: the mean of the rows of every vocabulary token matching the
regex (zeros with no regex or no match). Its ReToken then ADDS its trained row at that id, so the final embedding
of a new token is init + ReToken row. Other entries are regexes over existing tokens: nothing to add.

Here each adapter that brings tokens is a `TokenGroup`: its strings added to a copy of the pipeline's tokenizer and
its init rows appended to the text encoder's base table (so its ReToken rows stay an ordinary adapter, scaled like
the rest). Removing the adapter drops its rows (from the table and from every other adapter's one-hot `down`) and
rebuilds the tokenizer from the original one, so everything is as before, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from wurst_jax.lora.peft_format import LoraError


@dataclass(frozen=True)
class TokenGroup:
    """One adapter's added tokens: their strings (in id order) and the table rows they start at."""

    adapter: str
    strings: tuple[str, ...]
    start: int


def parse(train_tokens: Any) -> list[tuple[str, str | None]]:
    """`train_tokens` as the original's config writes them: [[token, aggregation regex or None], ...]; a bare
    string is (string, None)."""
    out = []
    for entry in [train_tokens] if isinstance(train_tokens, str) else list(train_tokens):
        pair = (entry, None) if isinstance(entry, str) else tuple(entry)
        if len(pair) != 2 or not isinstance(pair[0], str) or not (pair[1] is None or isinstance(pair[1], str)):
            raise LoraError(f"train_tokens: {entry!r} is not a token string or a [token, aggregation regex] pair")
        out.append(pair)
    return out


def is_new(token: str) -> bool:
    """Whether the original adds `token` to the tokenizer (rather than reading it as a regex over the vocabulary)."""
    return (token.startswith("[") and token.endswith("]")) or (token.startswith("<") and token.endswith(">"))


def table_path(variables: Any) -> tuple[str, ...]:
    for path in traverse_util.flatten_dict(dict(variables)):
        if path[-2:] == ("token_embedding", "embedding"):
            return path
    raise LoraError("train_tokens: this pipeline's text encoder has no CLIP token embedding")


def with_tokens(tokenizer: Any, strings: list[str]) -> Any:
    """A copy of a `ClipTokenizer` with `strings` added as single tokens (as transformers' `add_tokens`: not
    special, matched on the normalised text), ids from its current size on; the shared original is left alone."""
    from tokenizers import AddedToken, Tokenizer

    if not hasattr(tokenizer, "backend"):
        raise LoraError(f"train_tokens: need the project's CLIP tokenizer, not {type(tokenizer).__name__}")
    out = copy.copy(tokenizer)
    out.backend = Tokenizer.from_str(tokenizer.backend.to_str())
    out.backend.add_tokens([AddedToken(s, lstrip=False, rstrip=False, normalized=True) for s in strings])
    return out


def init_rows(tokenizer: Any, table: np.ndarray, pairs: list[tuple[str, str | None]]) -> np.ndarray:
    """The original's initial rows for the new tokens of `pairs`: the mean of the rows whose token matches the
    aggregation regex, zeros without one (the vocabulary searched as it stands when that token is added)."""
    rows, added = [], []
    for token, regex in pairs:
        if not is_new(token):
            continue
        added.append(token)
        row = np.zeros((table.shape[1],), np.float32)
        if regex is not None:
            vocab = with_tokens(tokenizer, added).backend.get_vocab(with_added_tokens=True)
            ids = sorted(i for k, i in vocab.items() if re.search(regex, k) is not None and i < table.shape[0])
            if ids:
                row = np.asarray(table[ids], np.float32).mean(axis=0)
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, table.shape[1]), np.float32)


def leaf(variables: Any, path: tuple[str, ...]) -> Any:
    return traverse_util.flatten_dict(dict(variables))[path]


def set_table(target: Any, path: tuple[str, ...], rows: np.ndarray) -> None:
    """Give the un-adapted text encoder (a `LoraTarget` with nothing merged) table rows `rows` at `path`, on the
    old table's placement, and its module the matching `vocab_size`."""
    flat = traverse_util.flatten_dict(dict(target.component.variables))
    old = flat[path]
    new = rows.astype(old.dtype)
    flat[path] = new if isinstance(old, np.ndarray) else jax.device_put(new, old.sharding)
    target.component.variables = traverse_util.unflatten_dict(flat)
    module = target.component.module  # the embedding's shape is its config's vocab_size
    if getattr(module.config, "vocab_size", rows.shape[0]) != rows.shape[0]:
        target.component.module = module.clone(config=dataclasses.replace(module.config, vocab_size=rows.shape[0]))


def select_rows(target: Any, path: tuple[str, ...], keep: np.ndarray, extra: np.ndarray | None = None) -> None:
    """Keep table rows `keep` (then append `extra`) in the base table and in every adapter's one-hot `down`."""
    table = np.asarray(jax.device_get(leaf(target.component.variables, path)))
    extra = np.zeros((0, table.shape[1]), table.dtype) if extra is None else extra
    set_table(target, path, np.concatenate([table[keep], extra.astype(table.dtype)]))
    key = "/".join(path)
    for adapter in target.adapters.values():
        if key in adapter.layers:
            down = adapter.layers[key]["down"][keep]
            pad = np.zeros((len(extra), down.shape[1]), down.dtype)
            adapter.layers = {**adapter.layers, key: {**adapter.layers[key], "down": np.concatenate([down, pad])}}
