"""DDPM-Würstchen scheduler as pure JAX functions.

Numerically equivalent to diffusers' ``DDPMWuerstchenScheduler``: a cosine alpha-cumprod schedule over continuous
``t in [0, 1]`` (1 = pure noise). Unlike diffusers, the step is stateless: the caller passes ``t_prev`` explicitly
(diffusers looks it up as the entry after ``t`` in ``self.timesteps``) and the standard-normal ``noise`` (diffusers
draws it with ``randn_tensor`` inside ``step``). All math is elementwise with per-batch ``[B]`` scalars broadcast over
the trailing axes, so samples may be NHWC or NCHW. ``SchedulerConfig`` is static (hashable); close over it when
jitting, e.g. ``jax.jit(functools.partial(step, config=cfg))``.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

DEFAULT_STAGE_C_TIMESTEPS: tuple[float, ...] = tuple(
    float(x) for x in list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0, 11))[1:]
)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler hyper-parameters (diffusers ``scheduler_config.json``)."""

    scaler: float = 1.0
    s: float = 0.008

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
        """Build from a diffusers scheduler config dict; keys other than ``scaler``/``s`` are ignored."""
        cfg = cls(scaler=float(d.get("scaler", 1.0)), s=float(d.get("s", 0.008)))
        if not cfg.scaler > 0:
            raise ValueError(f"scheduler config 'scaler' must be > 0, got {cfg.scaler}")
        if not cfg.s >= 0:
            raise ValueError(f"scheduler config 's' must be >= 0, got {cfg.s}")
        return cfg


def alpha_cumprod(t: Any, config: SchedulerConfig) -> jnp.ndarray:
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
    config: SchedulerConfig,
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


def add_noise(original: jnp.ndarray, noise: jnp.ndarray, t: Any, config: SchedulerConfig) -> jnp.ndarray:
    """Forward diffusion ``sqrt(ac) * x0 + sqrt(1 - ac) * noise``.

    ``original``, ``noise``: ``[B, H, W, C]`` (any ``[B, ...]``); ``t``: ``[B]`` or scalar. Keeps ``original``'s dtype.
    """
    ac = alpha_cumprod(_broadcast(t, original), config)
    out = jnp.sqrt(ac) * original.astype(jnp.float32) + jnp.sqrt(1 - ac) * noise.astype(jnp.float32)
    return out.astype(original.dtype)
