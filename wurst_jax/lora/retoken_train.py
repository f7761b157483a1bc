"""ReToken training beside a Stable Cascade stage C LoRA: the original `train/train_c_lora.py`'s `train_tokens`.

Per (token, aggregation regex) entry, as the original: a `[name]` / `<name>` token is added to the tokenizer and the
text encoder's token table grows by its init row (`tokens.init_rows`: the mean of the rows matching the regex, zeros
without one); any other token is a regex selecting existing vocabulary tokens (those added so far included). The
selected ids (deduplicated, here in ascending order) get one trainable ReToken row each, zeros at step 0, ADDED to
the table — so the text encoder runs inside the loss and the prompts that contain those tokens train their rows.

    grown, ids = plan(tokenizer, train_tokens)  # checked before any weights are read
    text, text_params = grow(tokenizer, text, text_params, train_tokens)
    params = {**add_lora(prior_params, r, style="cascade"), TEXT: with_rows(text_params, len(ids))}
    loss = retoken_loss(prior, text, ids, empty_ids, empty_mask, cond_dropout, weighting)  # batch: ids, mask, latents
    setup = build_train_setup(loss, {"params": params}, run, trainable=trainable)
    ... train ...
    write_file(out, cascade_weights(prior_of(params)), dim, retoken=rows_of(params, ids))

The text encoder's weights (the grown table included) sit in the train state's frozen half under `TEXT`; only the
rows (and the LoRA) are differentiated and in the optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wurst_jax.lora import tokens
from wurst_jax.lora.train import is_lora, merged
from wurst_jax.sharding import ShardingPlan
from wurst_jax.train import objectives

TEXT = "text_encoder"  # the text encoder's subtree of the trained parameter tree
ROWS = "retoken_rows"  # [n, D] beside the token table: the trainable ReToken rows
_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


def plan(tokenizer: Any, train_tokens: Any) -> tuple[Any, np.ndarray]:
    """(the tokenizer with the new tokens added, the ReToken ids [n] ascending), before any weights are read; a
    ValueError names a new token already in the vocabulary (or given twice) or a regex selecting nothing."""
    pairs = tokens.parse(train_tokens)
    if not hasattr(tokenizer, "backend"):
        raise ValueError(f"train_tokens: need the project's CLIP tokenizer, not {type(tokenizer).__name__}")
    known, size = tokenizer.backend.get_vocab(with_added_tokens=True), tokenizer.backend.get_vocab_size(True)
    new = [t for t, _ in pairs if tokens.is_new(t)]
    taken = sorted({t for t in new if t in known} | {t for t in new if new.count(t) > 1})
    if taken:
        raise ValueError(f"train_tokens: {taken} already a token of the tokenizer or given twice")
    ids, added = set(), []
    for token, _ in pairs:
        if tokens.is_new(token):
            added.append(token)
            ids.add(size + len(added) - 1)  # the original: len(tokenizer.vocab) - 1 after adding it
            continue
        vocab = tokens.with_tokens(tokenizer, added).backend.get_vocab(with_added_tokens=True)
        hits = {i for k, i in vocab.items() if re.search(token, k) is not None}
        if not hits:
            raise ValueError(f"train_tokens: the regex {token!r} matches no token of the vocabulary")
        ids |= hits
    grown = tokens.with_tokens(tokenizer, added) if added else tokenizer
    return grown, np.asarray(sorted(ids), np.int64)


def grow(tokenizer: Any, text: Any, text_params: Any, train_tokens: Any) -> tuple[Any, Any]:
    """(the text module for the grown table, its params with the new tokens' init rows appended); `tokenizer`:
    the one `plan` grew from (its vocabulary must be the table's)."""
    table = ShardingPlan.host(traverse_util.flatten_dict(text_params)[_TABLE])  # (all of it, on every host)
    size = tokenizer.backend.get_vocab_size(True)
    if size != table.shape[0]:
        raise ValueError(f"train_tokens: the tokenizer has {size} tokens but the text encoder's table {table.shape[0]}")
    rows = tokens.init_rows(tokenizer, table, tokens.parse(train_tokens)).astype(table.dtype)
    flat = dict(traverse_util.flatten_dict(text_params))
    flat[_TABLE] = jnp.concatenate([flat[_TABLE], jnp.asarray(rows)]) if len(rows) else flat[_TABLE]
    vocab = table.shape[0] + len(rows)
    if text.config.vocab_size != vocab:  # the embedding's shape is its config's vocab_size
        text = text.clone(config=dataclasses.replace(text.config, vocab_size=vocab))
    return text, traverse_util.unflatten_dict(flat)


def with_rows(text_params: Any, n: int) -> Any:
    """The text encoder's params with `n` ReToken rows (zeros, f32: the original's init) beside the table."""
    flat = dict(traverse_util.flatten_dict(text_params))
    flat[(*_TABLE[:-1], ROWS)] = jnp.zeros((n, flat[_TABLE].shape[1]), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def trainable(path: tuple[str, ...]) -> bool:
    """The trainable mask: the prior's LoRA leaves and the ReToken rows."""
    return is_lora(path) or path[-1] == ROWS


def encoder_params(text_params: Any, ids: np.ndarray) -> Any:
    """The text encoder's own params: the table plus its ReToken rows at `ids` (jit-able)."""
    flat = dict(traverse_util.flatten_dict(text_params))
    rows = flat.pop((*_TABLE[:-1], ROWS))
    table = flat[_TABLE]
    flat[_TABLE] = table.at[jnp.asarray(ids)].add(rows.astype(table.dtype))  # ReToken.forward: rows added
    return traverse_util.unflatten_dict(flat)


def retoken_loss(module, text, ids, empty_ids, empty_mask, cond_dropout: float, weighting: str = "p2"):
    """The stage C loss (`objectives.cascade_c_loss`) on batches {"ids", "mask" [B, 77], "latents"}: the text
    encoder runs on the current table, for the captions and for the empty prompt that dropped samples get (so a
    ReToken row on a special token moves both, as in the original, which encodes dropped captions as "")."""

    def loss(params, stats, rng, batch):
        prior = {k: v for k, v in params.items() if k != TEXT}
        encoder = {"params": encoder_params(params[TEXT], ids)}
        b = batch["ids"].shape[0]  # one encoder call for the captions and the empty prompt (one copy compiled)
        ids_all = jnp.concatenate([batch["ids"], jnp.asarray(empty_ids, batch["ids"].dtype)])
        mask_all = jnp.concatenate([batch["mask"], jnp.asarray(empty_mask, batch["mask"].dtype)])
        states = text.apply(encoder, ids_all, mask_all)
        hidden, pooled = states.hidden_states_last, states.text_embeds[:, None]
        empty = {"text": hidden[b:], "pooled": pooled[b:]}
        args = (batch["latents"], hidden[:b], pooled[:b], empty, cond_dropout)
        return objectives.cascade_c_loss(module, merged(prior), rng, *args, weighting=weighting), {}

    return loss


def prior_of(params: Any) -> Any:
    """The prior's subtree of the trained tree (for `train.cascade_weights`)."""
    return {k: v for k, v in params.items() if k != TEXT}


def rows_of(params: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ReToken rows [n, D] f32, their ids [n]) as the original's `embeddings.embeddings` / `embeddings.indices`."""
    rows = traverse_util.flatten_dict(params[TEXT])[(*_TABLE[:-1], ROWS)]
    return np.asarray(rows, np.float32), np.asarray(ids, np.int64)
