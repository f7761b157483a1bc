"""Repeated blocks run functionally on their parent's parameters: scanned (`jax.lax.scan`) and/or rematerialised
(`jax.checkpoint`), while the parameters keep the flat per-block names of the PyTorch state dict.

A repeat is a fixed sequence of blocks (Stage C: ResBlock, TimestepBlock, AttnBlock); repeat r reads its blocks'
parameters from the parent's children `names[r][k]`. Scanning stacks the repeats' parameters along a new leading
axis (a copy per call, in the parameters' dtype) so XLA compiles the sequence once instead of once per repeat;
remat keeps only each repeat's input for the backward pass and recomputes the rest. With dropout each block of each
repeat gets its own key, split from the parent's "dropout" stream.
Streaming (sequential offload, `stream=True`, implies scanning): the repeats' parameters stay in host memory (the
caller keeps them there), the stack is made in host memory, and each repeat's slice is moved to the device at the
top of the scan body, so the device holds one repeat's parameters at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# args(block) -> the block's inputs after x (skip, conditioning, deterministic), the same for every repeat
BlockArgs = Callable[[nn.Module], tuple]


def apply_repeats(
    parent: nn.Module,
    x: jax.Array,
    names: Sequence[Sequence[str]],
    blocks: Sequence[nn.Module],
    args: BlockArgs,
    *,
    scan: bool,
    remat: bool,
    deterministic: bool,
    stream: bool = False,
) -> jax.Array:
    """`x` through `len(names)` repeats of `blocks` (unbound modules) on `parent`'s parameters; see the module doc.
    Call from inside `parent`'s compact method, in apply mode (initialisation creates the children as usual)."""
    params = nn.meta.unbox(parent.variables["params"])
    repeats = [tuple(params[name] for name in rep) for rep in names]
    keys = None if deterministic else jax.random.split(parent.make_rng("dropout"), (len(names), len(blocks)))

    def body(x: jax.Array, p: tuple[Any, ...], key: jax.Array | None) -> jax.Array:
        for k, block in enumerate(blocks):
            rngs = {} if key is None else {"dropout": key[k]}
            x = block.apply({"params": p[k]}, x, *args(block), rngs=rngs)
        return x

    if stream:  # one repeat's parameters to the device per scan step (before remat: the backward pass fetches too)
        resident = body

        def body(x: jax.Array, p: tuple[Any, ...], key: jax.Array | None) -> jax.Array:
            return resident(x, jax.device_put(p, jax.memory.Space.Device), key)

    if remat:  # inside scan the loop already keeps XLA from merging recompute and forward (jax docs)
        body = jax.checkpoint(body, prevent_cse=not scan)
    if not (scan or stream):
        for r, p in enumerate(repeats):
            x = body(x, p, None if keys is None else keys[r])
        return x
    stack = lambda reps: jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *reps)  # noqa: E731
    if stream:  # the stack is made where the parameters are: host memory
        from jax.experimental.compute_on import compute_on

        with compute_on("device_host"):
            stacked = jax.jit(stack)(repeats)
    else:
        stacked = stack(repeats)
    x, _ = jax.lax.scan(lambda x, xs: (body(x, *xs), None), x, (stacked, keys))
    return x
