"""Randomness of a pipeline call: one PRNG key per image, and named streams folded into it.

Image i draws from `fold_in(key_i, stream)`, so its noise depends only on its own seed and the stream, not on the
batch it is generated in. `key_i` is `fold_in(key(seed), i)` for an int seed, or `key(seed_i)` for a list.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np


class Stream(enum.IntEnum):
    """What a random draw is for (the values are part of the reproducibility contract: never renumber)."""

    PRIOR_LATENTS = 0  # the prior's initial noise (image-to-image: the noise the image is diffused with)
    PRIOR_STEPS = 1  # the prior sampler's per-step noise
    DECODER_LATENTS = 2
    DECODER_STEPS = 3


def fresh_seed() -> int:
    return int.from_bytes(np.random.default_rng().bytes(4), "little")


def image_keys(seed: int | list[int] | None, n: int) -> jax.Array:
    """One PRNG key per image: `seed` int → fold_in(key(seed), i); a list gives each image its own seed."""
    if seed is None:
        seed = fresh_seed()
    if isinstance(seed, (list, tuple)):
        if len(seed) != n or not all(isinstance(s, (int, np.integer)) for s in seed):
            raise ValueError(f"`seed` as a list needs {n} integers (one per image), got {seed!r}")
        return jnp.stack([jax.random.key(int(s)) for s in seed])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int or a list of ints, got {seed!r}")
    base = jax.random.key(int(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


def draw(keys: jax.Array, stream: Stream, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal [N, *shape], image i drawn from fold_in(keys[i], stream) (independent of the batch)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, int(stream)), shape, jnp.float32))(keys)


def step_noise(keys: jax.Array, stream: Stream, steps: int, shape: tuple[int, ...]) -> jax.Array:
    """Per-step noise [S, N, *shape]."""
    return jnp.swapaxes(draw(keys, stream, (steps, *shape)), 0, 1)
