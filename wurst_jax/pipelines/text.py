"""The text stage of a pipeline: a tokenizer and a CLIP text encoder turn prompts into text states, weighted
where the prompt uses Compel's syntax (`prompts.py`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from wurst_jax.models.clip_text import CLIPTextOutput
from wurst_jax.pipelines.components import Component
from wurst_jax.pipelines.prompts import has_weights, strip_weights, tokenize, tokenize_weighted
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.sharding import ShardingPlan


def encode_text(variables: Any, input_ids: Any, attention_mask: Any, *, module: Any) -> Any:
    """The compiled text function: token ids [B, 77] and mask → the encoder's last_hidden_state [B, 77, D]
    (CLIPTextModel), or with a projection also the last layer's states before the final norm [B, 77, D] (Stable
    Cascade's text conditioning) and the pooled `text_embeds` [B, P]."""
    out = module.apply(variables, input_ids, attention_mask)
    if isinstance(out, CLIPTextOutput):
        return out.last_hidden_state, out.hidden_states_last, out.text_embeds
    return out


class TextEncoder:
    """Prompts → text states [N, 77, D] (numpy, on every host); `h_w = h_empty + w · (h - h_empty)` per weighted
    token. `with_pooled`: Stable Cascade's conditioning from an encoder with a projection."""

    def __init__(self, tokenizer: Any, encoder: Component, plan: ShardingPlan, compiler: CompileCache):
        self.tokenizer, self.encoder, self.plan, self.compiler = tokenizer, encoder, plan, compiler

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """last_hidden_state [N, 77, D] (Würstchen v2's conditioning)."""
        return self._states(prompts, 0)[0]

    def with_pooled(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the last layer's states before the final norm [N, 77, D], pooled text_embeds [N, 1, P]) of a
        `CLIPTextModelWithProjection`; weighting moves the states only (the pooled embedding is the plain
        prompt's)."""
        outs = self._states(prompts, 1)
        if len(outs) != 3:
            raise ValueError(f"{type(self.encoder.module).__name__} has no projection: pooled embeddings need one")
        return outs[1], outs[2][:, None]

    def _states(self, prompts: list[str], weighted: int) -> list[np.ndarray]:
        """The encoder's outputs for `prompts`, output `weighted` moved by the prompts' weights."""
        ids, mask = tokenize(self.tokenizer, [strip_weights(p) for p in prompts])
        with self.encoder.on_device() as variables:
            outs = list(self._encode(variables, ids, mask))
            rows = [i for i, p in enumerate(prompts) if has_weights(p)]
            if rows:  # only the weighted prompts' rows move: a plain prompt's states never depend on its batch
                tokens = [tokenize_weighted(self.tokenizer, prompts[i]) for i in rows]
                ids_w, mask_w, w = (np.stack(x) for x in zip(*tokens, strict=True))
                empty = self._encode(variables, *tokenize(self.tokenizer, [""] * len(rows)))[weighted]
                full = self._encode(variables, ids_w, mask_w)[weighted]
                outs[weighted] = outs[weighted].copy()
                outs[weighted][rows] = empty + w[..., None] * (full - empty)
        return outs

    def _encode(self, variables: Any, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each distinct row encoded on its own (one compiled [1, 77] program): a prompt's states then do not depend
        on the other prompts of its batch, so a batch job's image equals the one-prompt call's bit for bit."""
        rows = np.concatenate([ids, mask], axis=1)
        unique, where = np.unique(rows, axis=0, return_inverse=True)
        parts = [self._encode_batch(variables, u[None, : ids.shape[1]], u[None, ids.shape[1] :]) for u in unique]
        return tuple(np.concatenate(x)[where.reshape(-1)] for x in zip(*parts, strict=True))

    def _encode_batch(self, variables: Any, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        plan = self.plan
        out = self.compiler(
            "text_encoder",
            plan.per_device(encode_text, (None, 0, 0)),
            {"module": self.encoder.module},
            variables,
            plan.batch(ids),
            plan.batch(mask),
        )
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(plan.host(x)[: len(ids)] for x in outs)
