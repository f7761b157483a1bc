"""The DDPM-Würstchen sampler (both Würstchen v2 and Stable Cascade use it), as pure JAX functions.

Numerically equivalent to diffusers' ``DDPMWuerstchenScheduler``: a cosine alpha-cumprod schedule over continuous
``t in [0, 1]`` (1 = pure noise). Unlike diffusers, the step is stateless: the caller passes ``t_prev`` explicitly
(diffusers looks it up as the entry after ``t`` in ``self.timesteps``) and the standard-normal ``noise`` (diffusers
draws it with ``randn_tensor`` inside ``step``). All math is elementwise with per-batch ``[B]`` scalars broadcast over
the trailing axes, so samples may be NHWC or NCHW. ``DDPMWuerstchen`` holds the two hyper-parameters and is the
sampler object (`wurst_jax.samplers.Sampler`): hashable, so it is a static argument under jit.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

DEFAULT_STAGE_C_TIMESTEPS: tuple[float, ...] = tuple(
    float(x) for x in list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0, 11))[1:]
)


@dataclasses.dataclass(frozen=True)
class DDPMWuerstchen:
    """The sampler: diffusers ``scheduler_config.json``'s hyper-parameters, and the steps as methods."""

    scaler: float = 1.0
    s: float = 0.008

    class_name = "DDPMWuerstchenScheduler"  # diffusers' `_class_name` for this sampler

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DDPMWuerstchen":
        """Build from a diffusers scheduler config dict (its ``_class_name``, when present, must be this one's);
        keys other than ``scaler``/``s`` are ignored."""
        name = d.get("_class_name", cls.class_name)
        if name != cls.class_name:
            raise ValueError(f"scheduler config is a {name!r}; Würstchen and Stable Cascade use {cls.class_name!r}")
        try:
            cfg = cls(scaler=float(d.get("scaler", 1.0)), s=float(d.get("s", 0.008)))
        except (TypeError, ValueError):
            raise ValueError(f"scheduler config 'scaler' / 's' must be numbers, got {d}") from None
        if not cfg.scaler > 0:
            raise ValueError(f"scheduler config 'scaler' must be > 0, got {cfg.scaler}")
        if not cfg.s >= 0:
            raise ValueError(f"scheduler config 's' must be >= 0, got {cfg.s}")
        return cfg

    def timesteps(self, num_inference_steps: int | None = None, timesteps: Any = None, t_start: float = 1.0):
        """The schedule ``[S + 1]`` from ``t_start`` down (``t_start < 1``: image-to-image, from a noised image):
        ``num_inference_steps`` evenly spaced steps from ``t_start`` to 0, or the given descending ``timesteps``
        from ``t_start`` on (see `truncate`)."""
        if num_inference_steps is not None and timesteps is None:
            n = len(globals()["timesteps"](num_inference_steps)) - 1  # validates the count
            return np.linspace(_check_t_start(t_start), 0.0, n + 1).astype(np.float32)
        return truncate(globals()["timesteps"](num_inference_steps, timesteps), t_start)

    def step(self, model_output, t, t_prev, sample, noise) -> jnp.ndarray:
        return step(model_output, t, t_prev, sample, noise, self)

    def add_noise(self, original, noise, t) -> jnp.ndarray:
        return add_noise(original, noise, t, self)

    def alpha_cumprod(self, t) -> jnp.ndarray:
        return alpha_cumprod(t, self)


def alpha_cumprod(t: Any, config: DDPMWuerstchen) -> jnp.ndarray:
    """Cosine alpha-cumprod at ``t`` (any shape, float32), clamped to ``[1e-4, 0.9999]``."""
    t = jnp.asarray(t, jnp.float32)
    if config.scaler > 1:
        t = 1 - (1 - t) ** jnp.float32(config.scaler)
    elif config.scaler < 1:
        t = t ** jnp.float32(config.scaler)
    s = jnp.float32(config.s)
    init = jnp.cos(s / (1 + s) * jnp.float32(np.pi) * 0.5) ** 2
    ac = jnp.cos((t + s) / (1 + s) * jnp.float32(np.pi) * 0.5) ** 2 / init
    return jnp.clip(ac, 0.0001, 0.9999)


def timesteps(num_inference_steps: int | None = None, timesteps: Any = None) -> np.ndarray:
    """Float32 timesteps ``[N + 1]`` from 1 (noise) down to the last value, like diffusers ``set_timesteps``.

    Pass exactly one of ``num_inference_steps`` (gives ``linspace(1, 0, n + 1)``) or a custom descending ``timesteps``
    sequence in ``[0, 1]`` (e.g. ``DEFAULT_STAGE_C_TIMESTEPS``). The sampling loop runs over consecutive pairs.
    """
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps")
    if timesteps is None:
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
            raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
        return np.linspace(1.0, 0.0, int(n) + 1).astype(np.float32)
    ts = np.asarray(timesteps, dtype=np.float32)
    if ts.ndim != 1 or ts.size < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 values, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)):
        raise ValueError("timesteps must be finite")
    if not np.all(np.diff(ts) < 0):
        raise ValueError("timesteps must be strictly descending")
    if ts.min() < 0 or ts.max() > 1:
        raise ValueError("timesteps must lie within [0, 1]")
    return ts


def truncate(ts: np.ndarray, t_start: float) -> np.ndarray:
    """The part of a descending schedule from ``t_start`` on: ``t_start`` itself first (unless the schedule
    already starts there), then every later timestep below it. ``t_start = 1`` leaves a schedule from 1 as is."""
    t_start = _check_t_start(t_start)
    if t_start >= ts[0]:
        return ts
    rest = ts[ts < np.float32(t_start)]
    if rest.size == 0:
        raise ValueError(f"no timestep of the schedule lies below t_start={t_start}")
    return np.concatenate([np.asarray([t_start], np.float32), rest]).astype(np.float32)


def _check_t_start(t_start: Any) -> float:
    if isinstance(t_start, bool) or not isinstance(t_start, int | float | np.floating) or not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be a number in (0, 1], got {t_start!r}")
    return float(t_start)


def _broadcast(t: Any, x: jnp.ndarray) -> jnp.ndarray:
    """Per-batch ``t`` (scalar or ``[B]``) -> float32 ``[B, 1, ..., 1]`` broadcastable against ``x`` ``[B, ...]``."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.broadcast_to(t, x.shape[:1]).reshape(x.shape[:1] + (1,) * (x.ndim - 1))


def step(
    model_output: jnp.ndarray,
    t: Any,
    t_prev: Any,
    sample: jnp.ndarray,
    noise: jnp.ndarray,
    config: DDPMWuerstchen,
) -> jnp.ndarray:
    """One DDPM-Würstchen step ``x_t -> x_{t_prev}``; returns ``prev_sample`` with ``sample``'s shape and dtype.

    ``model_output``, ``sample``, ``noise``: ``[B, H, W, C]`` (or ``[B, C, H, W]``); ``noise`` is standard normal.
    ``t``, ``t_prev``: ``[B]`` float32 or scalars. No noise is added where ``t_prev == 0``.
    """
    x = sample.astype(jnp.float32)
    eps = model_output.astype(jnp.float32)
    t_prev = _broadcast(t_prev, x)
    ac = alpha_cumprod(_broadcast(t, x), config)
    ac_prev = alpha_cumprod(t_prev, config)
    alpha = ac / ac_prev
    mu = jnp.sqrt(1.0 / alpha) * (x - (1 - alpha) * eps / jnp.sqrt(1 - ac))
    std = jnp.sqrt((1 - alpha) * (1.0 - ac_prev) / (1.0 - ac)) * noise.astype(jnp.float32)
    pred = mu + std * (t_prev != 0).astype(jnp.float32)
    return pred.astype(sample.dtype)


def add_noise(original: jnp.ndarray, noise: jnp.ndarray, t: Any, config: DDPMWuerstchen) -> jnp.ndarray:
    """Forward diffusion ``sqrt(ac) * x0 + sqrt(1 - ac) * noise``.

    ``original``, ``noise``: ``[B, H, W, C]`` (any ``[B, ...]``); ``t``: ``[B]`` or scalar. Keeps ``original``'s dtype.
    """
    ac = alpha_cumprod(_broadcast(t, original), config)
    out = jnp.sqrt(ac) * original.astype(jnp.float32) + jnp.sqrt(1 - ac) * noise.astype(jnp.float32)
    return out.astype(original.dtype)
