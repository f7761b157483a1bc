"""LoRA methods for pipelines, with diffusers' names: `load_lora_weights`, `set_adapters`, `fuse_lora`,
`unfuse_lora`, `unload_lora_weights`, `get_active_adapters`.

Unfused adapters live beside the frozen weights and go into the stage's compiled loop as arguments (all loaded
adapters, inactive ones at scale 0), so loading the first set compiles once and later `set_adapters` calls,
rescaling and switching reuse the executable. The text encoder runs once per prompt: its adapters are merged into
a copy of its weights whenever they change (same shapes, no recompilation either). `fuse_lora` merges the current
prior adapters into the prior's weights (no per-step cost); `unfuse_lora` restores the weights kept aside.
An original Stable Cascade file's train tokens (`train_tokens=`) grow the tokenizer and the token table (`tokens.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from wurst_jax.lora import tokens
from wurst_jax.lora.adapter import LoraAdapter, apply_adapters
from wurst_jax.lora.peft_format import LoraError, read_lora_file


class LoraTarget:
    """One LoRA-able component of a pipeline: its `Component`, its adapters and the weights kept aside."""

    def __init__(self, component: Any, in_loop: bool):
        self.component, self.in_loop = component, in_loop
        self.adapters: dict[str, LoraAdapter] = {}
        self.base = None  # the un-adapted variables while something is merged into component.variables
        self.fused = False

    def shapes(self) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._base())

    def _base(self) -> Any:
        return self.component.variables if self.base is None else self.base

    def loop_adapters(self) -> list | None:
        """(layers, scale) for the compiled loop: None when nothing is loaded or everything is fused."""
        if not self.in_loop or self.fused or not self.adapters:
            return None
        return [(a.layers, jax.numpy.float32(a.scale)) for a in self.adapters.values()]

    def refresh(self) -> None:
        """Re-merge where merging is how this component applies adapters (text encoder; fused prior)."""
        if self.in_loop and not self.fused:
            self.restore()
            return
        base = self._base()
        active = [a for a in self.adapters.values() if a.scale != 0]
        if not active:
            self.restore()
            return
        self.base = base
        merged = apply_adapters(base, active)
        self.component.variables = jax.device_get(merged) if self.component.offload else merged

    def restore(self) -> None:
        if self.base is not None:
            self.component.variables, self.base = self.base, None


class LoraMixin:
    """Pipelines that define `_lora_components()` → {file prefix: (Component, applied in the compiled loop)}."""

    def _lora(self) -> dict[str, LoraTarget]:
        if not hasattr(self, "_lora_targets"):
            self._lora_targets = {k: LoraTarget(c, loop) for k, (c, loop) in self._lora_components().items()}
        return self._lora_targets

    def load_lora_weights(
        self,
        path: Any,
        adapter_name: str | None = None,
        scale: float = 1.0,
        module_filters: Any = None,
        train_tokens: Any = None,
    ) -> None:
        """Add the adapters of a diffusers/PEFT LoRA file (or a folder with `pytorch_lora_weights.safetensors`),
        or of an original Stable Cascade one (`lora.safetensors`: stage C weights and ReToken rows; its training
        config's `module_filters`, default `['.attn']`, and `train_tokens`, e.g. `[['[fernando]', '^dog</w>']]`
        or `['[fernando]']`: its `[...]` / `<...>` tokens become tokens of the tokenizer and rows of the text
        encoder's table until the adapter is unloaded), under `adapter_name` (default `default_<n>`), active at
        `scale`. Bad files raise `LoraError`, unapplied."""
        targets = self._lora()
        names = {n for t in targets.values() for n in t.adapters}
        name = adapter_name or f"default_{len(names)}"
        if name in names:
            raise LoraError(f"adapter name {name!r} is already loaded; unload it or pick another name")
        added = self._add_tokens(name, train_tokens) if train_tokens is not None or self._groups() else None
        try:
            layers = read_lora_file(path, {k: t.shapes() for k, t in targets.items()}, module_filters, added)
        except Exception:
            self._drop_tokens({name})
            raise
        for prefix, adapter in layers.items():
            targets[prefix].adapters[name] = LoraAdapter(name, adapter, float(scale))
            targets[prefix].refresh()
        if added is not None:  # the text encoder's table may have grown: re-merge its other adapters
            targets["text_encoder"].refresh()

    def get_active_adapters(self) -> dict[str, float]:
        return {n: a.scale for t in self._lora().values() for n, a in t.adapters.items() if a.scale != 0}

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Activate these adapters at these scales (default 1); every other loaded adapter goes to scale 0."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if adapter_weights is not None else 1.0
        weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter weights")
        loaded = {n for t in self._lora().values() for n in t.adapters}
        unknown = sorted(set(names) - loaded)
        if unknown:
            raise LoraError(f"unknown adapter(s) {unknown}; loaded: {sorted(loaded)}")
        scales = dict(zip(names, weights, strict=True))
        for t in self._lora().values():
            for n, a in t.adapters.items():
                a.scale = float(scales.get(n, 0.0))
            t.refresh()

    def fuse_lora(self) -> None:
        """Merge the active adapters into the weights: no per-step cost until `unfuse_lora`."""
        for t in self._lora().values():
            t.fused = True
            t.refresh()

    def unfuse_lora(self) -> None:
        """Back to the original weights, adapters applied unfused again."""
        for t in self._lora().values():
            t.fused = False
            t.restore()
            t.refresh()

    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        """Drop one adapter (or all) and restore the original weights (and tokenizer) where nothing is left."""
        for t in self._lora().values():
            if adapter_name is None:
                t.adapters.clear()
            else:
                t.adapters.pop(adapter_name, None)
            t.restore()
        self._drop_tokens({g.adapter for g in self._groups()} if adapter_name is None else {adapter_name})
        for t in self._lora().values():
            t.fused = t.fused and bool(t.adapters)
            t.refresh()

    def _lora_host(self) -> Any:
        """The pipeline whose `text` (tokenizer + encoder) the adapters' train tokens go to."""
        return self

    def _groups(self) -> list:
        return self._lora_host().__dict__.setdefault("_token_groups", [])

    def _add_tokens(self, name: str, train_tokens: Any) -> tuple[int, int, int]:
        """Add `train_tokens`' new tokens for adapter `name` (tokenizer + init rows of the text encoder's base
        table); (the original vocabulary, the first new row, the count) for the file reader."""
        target = self._lora().get("text_encoder")
        if target is None:
            raise LoraError("train_tokens: this pipeline has no text encoder")
        pairs = tokens.parse([] if train_tokens is None else train_tokens)
        new = [t for t, _ in pairs if tokens.is_new(t)]
        target.restore()
        path = tokens.table_path(target.component.variables)
        table = np.asarray(jax.device_get(tokens.leaf(target.component.variables, path)))
        host = self._lora_host()
        tokenizer = host.text.tokenizer
        if new and not hasattr(tokenizer, "backend"):
            raise LoraError(f"train_tokens: need the project's CLIP tokenizer, not {type(tokenizer).__name__}")
        if not self._groups():
            host._base_tokenizer, host._vocab = tokenizer, table.shape[0]
        size = tokenizer.backend.get_vocab_size(with_added_tokens=True) if new else table.shape[0]
        known = tokenizer.backend.get_vocab(with_added_tokens=True) if new else {}
        problems = [f"{t!r} is already a token" for t in dict.fromkeys(new) if t in known]
        problems += [f"{t!r} is given twice" for t in dict.fromkeys(new) if new.count(t) > 1]
        if size != table.shape[0]:
            problems.append(f"the tokenizer has {size} tokens but the text encoder's table {table.shape[0]} rows")
        if problems:
            target.refresh()
            raise LoraError("train_tokens: " + "; ".join(problems))
        start = table.shape[0]
        if new:
            grown = tokens.with_tokens(tokenizer, new)
            tokens.select_rows(target, path, np.arange(start), tokens.init_rows(tokenizer, table, pairs))
            host.text.tokenizer = grown
            self._groups().append(tokens.TokenGroup(name, tuple(new), start))
        return (host._vocab, start, len(new))

    def _drop_tokens(self, adapters: set) -> None:
        """Remove the added tokens of `adapters` (their rows, in the table and in every adapter's one-hot down);
        the remaining groups' tokens move down, the tokenizer is rebuilt from the original one."""
        groups = self._groups()
        if not any(g.adapter in adapters for g in groups):
            return
        host, target = self._lora_host(), self._lora()["text_encoder"]
        target.restore()
        keep, kept = [np.arange(host._vocab)], []
        tokenizer = host._base_tokenizer
        for g in groups:
            if g.adapter not in adapters:
                keep.append(np.arange(g.start, g.start + len(g.strings)))
                kept.append(tokens.TokenGroup(g.adapter, g.strings, sum(map(len, keep[:-1]))))
                tokenizer = tokens.with_tokens(tokenizer, list(g.strings))
        tokens.select_rows(target, tokens.table_path(target.component.variables), np.concatenate(keep))
        groups[:] = kept
        host.text.tokenizer = tokenizer
        target.refresh()
