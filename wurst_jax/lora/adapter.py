"""Low-rank adapters on a Flax variable tree, independent of the model family.

An adapter is a dict `{"params/blocks_2/attention/to_q/kernel": {"down": [in, r], "up": [r, out]}, ...}` keyed by
the '/'-joined path of a 2-D Dense `kernel` [in, out]; its delta is `down @ up` (PEFT's `alpha / r` is already
folded into `up`). Adapters are plain pytrees so they can be arguments of a compiled function: changing a scale
(an array) or swapping an adapter of the same shapes reuses the executable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Adapter = dict[str, dict[str, Any]]


@dataclass
class LoraAdapter:
    """A named adapter: `layers` (see the module docstring) and its current `scale` (0 turns it off)."""

    name: str
    layers: Adapter
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return max(int(v["down"].shape[-1]) for v in self.layers.values())


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def merge(variables: Any, adapters: list[tuple[Adapter, Any]]) -> Any:
    """`variables` with `W + Σ scale_i · down_i @ up_i` on every adapted kernel (jit-able; `scale_i` may be a traced
    scalar). Leaves no adapter touches are the same objects as in `variables`; the delta is computed in f32 and the
    result keeps the kernel's dtype."""
    deltas: dict[str, Any] = {}
    for layers, scale in adapters:
        for key, ab in layers.items():
            d = jnp.asarray(ab["down"], jnp.float32) @ jnp.asarray(ab["up"], jnp.float32)
            deltas[key] = deltas.get(key, 0.0) + jnp.asarray(scale, jnp.float32) * d
    if not deltas:
        return variables
    return _replace(variables, (), deltas)


def _replace(tree: Any, path: tuple[str, ...], deltas: dict[str, Any]) -> Any:
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        key = "/".join(path)
        if key not in deltas:
            return tree
        return (jnp.asarray(tree, jnp.float32) + deltas[key]).astype(tree.dtype)
    prefix = "/".join(path)
    if path and not any(k.startswith(prefix + "/") for k in deltas):
        return tree  # nothing adapted below: keep the subtree as is
    return {k: _replace(v, (*path, k), deltas) for k, v in tree.items()}


def apply_adapters(variables: Any, adapters: list[LoraAdapter]) -> Any:
    """Eagerly merged variables for a list of adapters at their current scales (for fusing)."""
    return jax.jit(merge)(variables, [(a.layers, a.scale) for a in adapters])


def check_against(variables: Any, layers: Adapter) -> list[tuple[str, str]]:
    """(key, problem) of `layers` against a variable tree: missing kernels, non-2-D kernels, mis-shaped factors."""
    problems = []
    for key, ab in layers.items():
        try:
            w = _get(variables, tuple(key.split("/")))
        except (KeyError, TypeError):
            problems.append((key, "no such weight in the model"))
            continue
        shape = tuple(w.shape)
        down, up = tuple(ab["down"].shape), tuple(ab["up"].shape)
        if len(shape) != 2:
            problems.append((key, f"LoRA supports Linear (2-D) weights, this one has shape {shape}"))
        elif len(down) != 2 or len(up) != 2 or down[1] != up[0] or (down[0], up[1]) != shape:
            got = f"lora_A [{down[-1]}, {down[0]}] / lora_B [{up[-1]}, {up[0]}]" if len(down) == len(up) == 2 else ""
            problems.append((key, f"LoRA factors {got or 'not 2-D'} do not fit the weight [out, in] {shape[::-1]}"))
    return problems
