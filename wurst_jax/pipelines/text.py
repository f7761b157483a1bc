"""The text stage of a pipeline: a tokenizer and a CLIP text encoder turn prompts into text states, weighted
where the prompt uses Compel's syntax (`prompts.py`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from wurst_jax.pipelines.components import Component
from wurst_jax.pipelines.prompts import has_weights, strip_weights, tokenize, tokenize_weighted
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.sharding import ShardingPlan


def encode_text(variables: Any, input_ids: Any, attention_mask: Any, *, module: Any) -> Any:
    """The compiled text function: token ids [B, 77] and mask → the encoder's output (last_hidden_state)."""
    return module.apply(variables, input_ids, attention_mask)


class TextEncoder:
    """Prompts → text states [N, 77, D] (numpy, on every host); `h_w = h_empty + w · (h - h_empty)` per weighted
    token."""

    def __init__(self, tokenizer: Any, encoder: Component, plan: ShardingPlan, compiler: CompileCache):
        self.tokenizer, self.encoder, self.plan, self.compiler = tokenizer, encoder, plan, compiler

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids, mask = tokenize(self.tokenizer, [strip_weights(p) for p in prompts])
        with self.encoder.on_device() as variables:
            states = self._encode(variables, ids, mask)
            if any(has_weights(p) for p in prompts):
                rows = [tokenize_weighted(self.tokenizer, p) for p in prompts]
                ids_w, mask_w, w = (np.stack(x) for x in zip(*rows, strict=True))
                empty = self._encode(variables, *tokenize(self.tokenizer, [""] * len(prompts)))
                states = empty + w[..., None] * (self._encode(variables, ids_w, mask_w) - empty)
        return states

    def _encode(self, variables: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        plan = self.plan
        out = self.compiler(
            "text_encoder", encode_text, {"module": self.encoder.module}, variables, plan.batch(ids), plan.batch(mask)
        )
        return plan.host(out)[: len(ids)]
