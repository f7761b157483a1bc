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


def check_seed(seed: int | list[int] | None, n: int) -> None:
    """A clear error unless `seed` is None, an int, or a list of `n` ints (nothing is computed)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n or not all(isinstance(s, (int, np.integer)) for s in seed):
            raise ValueError(f"`seed` as a list needs {n} integers (one per image), got {seed!r}")
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"`seed` must be an int or a list of ints, got {seed!r}")


def seed_keys(seed: int | list[int] | None, n: int) -> tuple[jax.Array, bool]:
    """(keys, fold): key(seed) and True for an int seed (`image_keys` folds in 0..n-1), or one key per image from a
    list and False. What `stage_noise` takes, so the folding runs inside its one compiled program."""
    check_seed(seed, n)
    if seed is None:
        seed = fresh_seed()
    if isinstance(seed, (list, tuple)):
        return jnp.stack([jax.random.key(int(s)) for s in seed]), False
    return jax.random.key(int(seed)), True


def fold_keys(keys: jax.Array, fold: bool, n: int) -> jax.Array:
    """`seed_keys`' keys → one key per image."""
    return jax.vmap(lambda i: jax.random.fold_in(keys, i))(jnp.arange(n)) if fold else keys


def image_keys(seed: int | list[int] | None, n: int) -> jax.Array:
    """One PRNG key per image: `seed` int → fold_in(key(seed), i); a list gives each image its own seed."""
    return fold_keys(*seed_keys(seed, n), n)


def draw(keys: jax.Array, stream: Stream, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal [N, *shape], image i drawn from fold_in(keys[i], stream) (independent of the batch)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, int(stream)), shape, jnp.float32))(keys)


def step_noise(keys: jax.Array, stream: Stream, steps: int, shape: tuple[int, ...]) -> jax.Array:
    """Per-step noise [S, N, *shape]."""
    return jnp.swapaxes(draw(keys, stream, (steps, *shape)), 0, 1)


def stage_noise(
    keys: jax.Array, *, fold: bool, n: int, streams: tuple[Stream, Stream], shape: tuple[int, ...], steps: int
) -> tuple[jax.Array, jax.Array]:
    """A stage's initial noise [N, *shape] (`streams[0]`) and per-step noise [S, N, *shape] (`streams[1]`) from
    `seed_keys`' keys: `draw` and `step_noise`, compiled as one program (the same numbers as drawing them apart)."""
    keys = fold_keys(keys, fold, n)
    return draw(keys, streams[0], shape), step_noise(keys, streams[1], steps, shape)
