"""LoRA training on any Flax parameter tree: adapter leaves beside the frozen kernels, a loss wrapper that merges
them in, the trainable mask, and the export to a diffusers/PEFT file.

    params = add_lora(variables["params"], rank=8, targets="attention", seed=0)
    setup = build_train_setup(lora_loss(loss), {"params": params}, run, trainable=is_lora)
    ... train ...
    write_lora_file(out, {"prior": adapter_of(merge_params(state.params, state.frozen))})

Each adapted Dense kernel `.../to_q/kernel` [in, out] gets `.../to_q/lora_down` [in, r] (PEFT's lora_A,
Kaiming-uniform as PEFT) and `.../to_q/lora_up` [r, out] (lora_B, zeros), so step 0 is the base model and the
delta is `lora_down @ lora_up` (alpha = r, the scaling diffusers assumes for files without alpha).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from wurst_jax.lora.adapter import Adapter

DOWN, UP = "lora_down", "lora_up"
ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")  # what diffusers' Würstchen LoRA script adapts
TARGETS = ("attention", "all-linear")


def _selected(path: tuple[str, ...], leaf: Any, targets: str) -> bool:
    if path[-1] != "kernel" or getattr(leaf, "ndim", 0) != 2:
        return False
    return targets == "all-linear" or path[-2] in ATTENTION


def add_lora(params: Any, rank: int, targets: str = "attention", seed: int = 0) -> Any:
    """`params` with a (down, up) pair beside every selected Dense kernel ("attention": to_q/to_k/to_v/to_out.0;
    "all-linear": every 2-D kernel). Raises when nothing matches."""
    if targets not in TARGETS:
        raise ValueError(f"LoRA targets must be one of {TARGETS}, got {targets!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
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


def is_lora(path: tuple[str, ...]) -> bool:
    """The trainable mask: adapter leaves only."""
    return path[-1] in (DOWN, UP)


def merged(params: Any) -> Any:
    """The model's own tree: every kernel plus its `down @ up`, the adapter leaves removed (jit-able)."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, x in flat.items():
        if is_lora(path):
            continue
        mod = path[:-1]
        if path[-1] == "kernel" and (*mod, DOWN) in flat:
            delta = flat[(*mod, DOWN)].astype(jnp.float32) @ flat[(*mod, UP)].astype(jnp.float32)
            x = (x.astype(jnp.float32) + delta).astype(x.dtype)
        out[path] = x
    return traverse_util.unflatten_dict(out)


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
