"""What a sampler is: a hashable object (a static argument under jit) with the schedule and the two diffusion
operations. `DDPMWuerstchen` (Würstchen v2 and Stable Cascade) is the first; a new sampler implements these three
methods and goes in its own file here."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np


class Sampler(Protocol):
    def timesteps(
        self, num_inference_steps: int | None = None, timesteps: Any = None, t_start: float = 1.0, shift: float = 1.0
    ) -> np.ndarray:
        """The schedule [S + 1], descending from `t_start` (1: pure noise) to the last value (0); `shift`: the
        original Stable Cascade's resolution shift of the schedule (1: none)."""

    def step(
        self, model_output: jax.Array, t: jax.Array, t_prev: jax.Array, sample: jax.Array, noise: jax.Array
    ) -> jax.Array:
        """One step x_t → x_{t_prev} given the model's output and standard-normal `noise` ([B] timesteps)."""

    def add_noise(self, original: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """Forward diffusion of a clean sample to time `t` ([B])."""

    def __hash__(self) -> int: ...
