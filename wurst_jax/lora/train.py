"""LoRA training on any Flax parameter tree: adapter leaves beside the frozen kernels, a loss wrapper that merges
them in, the trainable mask, and the export to a diffusers/PEFT file.

    params = add_lora(variables["params"], rank=8, targets="attention", seed=0)
    setup = build_train_setup(lora_loss(loss), {"params": params}, run, trainable=is_lora)
    ... train ...
    write_lora_file(out, {"prior": adapter_of(merge_params(state.params, state.frozen))})

Each adapted Dense kernel `.../to_q/kernel` [in, out] gets `.../to_q/lora_down` [in, r] (PEFT's lora_A,
Kaiming-uniform as PEFT) and `.../to_q/lora_up` [r, out] (lora_B, zeros), so step 0 is the base model and the
delta is `lora_down @ lora_up` (alpha = r, the scaling diffusers assumes for files without alpha).

`style="cascade"` trains the original Stable Cascade parametrisation instead (`cascade_format.py`): each adapted
Linear gets `sc_lora_down` [in, r] (zeros) and `sc_lora_up` [r, out] (normal(0, 1)), delta `down @ up / r`; an
attention's fused in_proj gets one pair at the attention module, `in_proj_sc_lora_down` [C, r] and
`in_proj_sc_lora_up` [r, 3C], whose delta is split over to_q / to_k / to_v. `cascade_weights` gives the pairs in
the original file's order for `cascade_format.to_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wurst_jax.lora import cascade_format
from wurst_jax.lora.adapter import Adapter

DOWN, UP = "lora_down", "lora_up"
SC_DOWN, SC_UP = "sc_lora_down", "sc_lora_up"  # the original Stable Cascade LoRA: delta down @ up / r
QKV_DOWN, QKV_UP = "in_proj_sc_lora_down", "in_proj_sc_lora_up"  # the same on a fused q/k/v in_proj
_LEAVES = (DOWN, UP, SC_DOWN, SC_UP, QKV_DOWN, QKV_UP)
_QKV = ("to_q", "to_k", "to_v")
ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")  # what diffusers' Würstchen LoRA script adapts
TARGETS = ("attention", "all-linear")
STYLES = ("peft", "cascade")


def _selected(path: tuple[str, ...], leaf: Any, targets: str) -> bool:
    if path[-1] != "kernel" or getattr(leaf, "ndim", 0) != 2:
        return False
    return targets == "all-linear" or path[-2] in ATTENTION


def add_lora(params: Any, rank: int, targets: str = "attention", seed: int = 0, style: str = "peft") -> Any:
    """`params` with a (down, up) pair beside every selected Dense kernel ("attention": to_q/to_k/to_v/to_out.0;
    "all-linear": every 2-D kernel). Raises when nothing matches. `style="cascade"`: the original Stable Cascade
    parametrisation (the module docstring) on the modules its `['.attn']` filter selects ("attention" only)."""
    if targets not in TARGETS:
        raise ValueError(f"LoRA targets must be one of {TARGETS}, got {targets!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if style not in STYLES:
        raise ValueError(f"LoRA style must be one of {STYLES}, got {style!r}")
    if style == "cascade":
        return _add_cascade(params, rank, targets, seed)
    flat = traverse_util.flatten_dict(params)
    chosen = sorted(p for p, x in flat.items() if _selected(p, x, targets))
    if not chosen:
        raise ValueError(f"no Linear layers match LoRA targets {targets!r}")
    key = jax.random.PRNGKey(seed)
    out = dict(flat)
    for i, path in enumerate(chosen):
        n_in, n_out = flat[path].shape
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) of an [r, in] weight, as PEFT's lora_A
        down = jax.random.uniform(jax.random.fold_in(key, i), (n_in, rank), jnp.float32, -bound, bound)
        out[(*path[:-1], DOWN)] = down
        out[(*path[:-1], UP)] = jnp.zeros((rank, n_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def _add_cascade(params: Any, rank: int, targets: str, seed: int) -> Any:
    if targets != "attention":
        raise ValueError("the original Stable Cascade LoRA adapts attention ('.attn'): use targets 'attention'")
    found, _ = cascade_format.sites({"params": params})
    if not found:
        raise ValueError("no attention layers for the original Stable Cascade LoRA (is this a stage C model?)")
    flat = traverse_util.flatten_dict(params)
    rng, out = np.random.default_rng(seed), dict(flat)  # host draws: no device op compiled per layer shape
    for site in found:
        paths = [p[1:] for p in site.paths]  # without "params"
        n_in, n_out = flat[paths[0]].shape[0], sum(flat[p].shape[1] for p in paths)
        mod, (down, up) = (paths[0][:-2], (QKV_DOWN, QKV_UP)) if site.in_proj else (paths[0][:-1], (SC_DOWN, SC_UP))
        out[(*mod, down)] = jnp.zeros((n_in, rank), jnp.float32)  # the original: lora_down zeros, lora_up N(0, 1)
        out[(*mod, up)] = jnp.asarray(rng.standard_normal((rank, n_out)), jnp.float32)
    return traverse_util.unflatten_dict(out)


def is_lora(path: tuple[str, ...]) -> bool:
    """The trainable mask: adapter leaves only."""
    return path[-1] in _LEAVES


def _delta(down: Any, up: Any, scaled: bool) -> jax.Array:
    d = down.astype(jnp.float32) @ up.astype(jnp.float32)
    return d / down.shape[-1] if scaled else d  # the original Stable Cascade scale alpha / r with alpha 1


def merged(params: Any) -> Any:
    """The model's own tree: every kernel plus its `down @ up`, the adapter leaves removed (jit-able)."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, x in flat.items():
        if is_lora(path):
            continue
        mod = path[:-1]
        delta = None
        if path[-1] == "kernel" and (*mod, DOWN) in flat:
            delta = _delta(flat[(*mod, DOWN)], flat[(*mod, UP)], False)
        elif path[-1] == "kernel" and (*mod, SC_DOWN) in flat:
            delta = _delta(flat[(*mod, SC_DOWN)], flat[(*mod, SC_UP)], True)
        elif path[-1] == "kernel" and mod[-1] in _QKV and (*mod[:-1], QKV_DOWN) in flat:
            full = _delta(flat[(*mod[:-1], QKV_DOWN)], flat[(*mod[:-1], QKV_UP)], True)
            delta = jnp.split(full, 3, axis=1)[_QKV.index(mod[-1])]
        if delta is not None:
            x = (x.astype(jnp.float32) + delta).astype(x.dtype)
        out[path] = x
    return traverse_util.unflatten_dict(out)


def cascade_weights(params: Any) -> list[tuple[Any, Any]]:
    """The trained original-style pairs as the original file holds them, (lora_down [r, in], lora_up [out, r]) in
    its module order (`cascade_format.sites`)."""
    flat = traverse_util.flatten_dict(params)
    pairs = []
    for site in cascade_format.sites({"params": params})[0]:
        p = site.paths[0][1:]
        down, up = ((*p[:-2], QKV_DOWN), (*p[:-2], QKV_UP)) if site.in_proj else ((*p[:-1], SC_DOWN), (*p[:-1], SC_UP))
        pairs.append((np.asarray(flat[down], np.float32).T, np.asarray(flat[up], np.float32).T))
    return pairs


def lora_loss(loss_fn: Callable) -> Callable:
    """`loss_fn(params, batch_stats, rng, batch)` on a tree with adapter leaves (merged before the model runs)."""

    def loss(params, *rest):
        return loss_fn(merged(params), *rest)

    return loss


def adapter_of(params: Any, collection: str = "params") -> Adapter:
    """The trained adapter in `adapter.py`'s form (keys of the model's variable tree), for `write_lora_file`."""
    flat = traverse_util.flatten_dict(params)
    return {
        "/".join((collection, *path[:-1], "kernel")): {"down": flat[path], "up": flat[(*path[:-1], UP)]}
        for path in flat
        if path[-1] == DOWN
    }
