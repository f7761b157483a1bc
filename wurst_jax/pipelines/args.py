"""Checks of pipeline arguments, shared by every pipeline: each error names the argument and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from wurst_jax.samplers import Sampler


def as_list(name: str, value: Any, allow_none: bool = False) -> list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {value!r}")


def per_image(name: str, value: Any, n: int) -> list[str]:
    """One text per image: a single text is shared, k texts (k dividing n) each cover n / k consecutive images."""
    texts = as_list(name, value)
    if n % len(texts):
        raise ValueError(f"`{name}` has {len(texts)} entries, which does not divide the {n} images")
    return [t for t in texts for _ in range(n // len(texts))]


def rows_per_image(name: str, x: np.ndarray, n: int) -> np.ndarray:
    """An array of k rows (k dividing n) → n rows, each row covering n / k consecutive images."""
    if x.shape[0] == 0 or n % x.shape[0]:
        raise ValueError(f"`{name}` has {x.shape[0]} rows, which does not divide the {n} images")
    return np.repeat(x, n // x.shape[0], axis=0)


def negatives(negative_prompt: Any, b: int) -> list[str]:
    """One negative prompt per prompt: None → "", one string → shared by all `b`, else exactly `b` of them."""
    texts = [""] * b if negative_prompt is None else as_list("negative_prompt", negative_prompt)
    if len(texts) == 1 and b > 1 and isinstance(negative_prompt, str):
        texts = texts * b
    if len(texts) != b:
        raise ValueError(f"`negative_prompt` has {len(texts)} entries but `prompt` has {b}")
    return texts


def check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an integer ≥ {low}, got {value!r}")
    return int(value)


def check_guidance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number ≥ 0, got {value!r}")
    return float(value)


def check_output_type(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"`output_type` must be one of {allowed}, got {value!r}")
    return value


def schedule(
    sampler: Sampler, name: str, steps: Any, timesteps: Any, t_start: float = 1.0, shift: float = 1.0
) -> np.ndarray:
    """The sampler's timesteps [S + 1] from `steps` or explicit `timesteps`, shifted by `shift` (1: not; only
    passed on when not 1, so a sampler without the option still runs unshifted); errors name the argument."""
    opts = {} if isinstance(shift, int | float) and not isinstance(shift, bool) and shift == 1 else {"shift": shift}
    try:
        if timesteps is not None:
            return sampler.timesteps(timesteps=list(timesteps), t_start=t_start, **opts)
        return sampler.timesteps(num_inference_steps=check_int(name, steps), t_start=t_start, **opts)
    except ValueError as e:
        raise ValueError(f"{e} (pipeline argument `{name}` / its timesteps)") from None
