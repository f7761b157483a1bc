"""The DDPM-Würstchen sampler (both Würstchen v2 and Stable Cascade use it), as pure JAX functions.

Numerically equivalent to diffusers' ``DDPMWuerstchenScheduler``: a cosine alpha-cumprod schedule over continuous
``t in [0, 1]`` (1 = pure noise). Unlike diffusers, the step is stateless: the caller passes ``t_prev`` explicitly
(diffusers looks it up as the entry after ``t`` in ``self.timesteps``) and the standard-normal ``noise`` (diffusers
draws it with ``randn_tensor`` inside ``step``). All math is elementwise with per-batch ``[B]`` scalars broadcast over
the trailing axes, so samples may be NHWC or NCHW. ``DDPMWuerstchen`` holds the two hyper-parameters and is the
sampler object (`wurst_jax.samplers.Sampler`): hashable, so it is a static argument under jit.

``shift`` (``timesteps(..., shift=2.0)``, `shift_timesteps`) is the original Stable Cascade's resolution shift of
its GDF schedule (stage C samples with ``shift=2`` in the original notebooks): logSNR(t) - 2·ln(shift), clamped to
the unshifted schedule's range, with the model fed GDF's noise condition of that logSNR. It is applied to the
timesteps themselves, so the step and the compiled loop are unchanged and ``shift=1`` is today's schedule as is.
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

    def timesteps(
        self, num_inference_steps: int | None = None, timesteps: Any = None, t_start: float = 1.0, shift: float = 1.0
    ):
        """The schedule ``[S + 1]`` from ``t_start`` down (``t_start < 1``: image-to-image, from a noised image):
        ``num_inference_steps`` evenly spaced steps from ``t_start`` to 0, or the given descending ``timesteps``
        from ``t_start`` on (see `truncate`); then shifted by ``shift`` (`shift_timesteps`; 1: unchanged)."""
        shift = _check_shift(shift)
        if num_inference_steps is not None and timesteps is None:
            n = len(globals()["timesteps"](num_inference_steps)) - 1  # validates the count
            ts = np.linspace(_check_t_start(t_start), 0.0, n + 1).astype(np.float32)
        else:
            ts = truncate(globals()["timesteps"](num_inference_steps, timesteps), t_start)
        return ts if shift == 1.0 else shift_timesteps(ts, shift, self)

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


def _check_shift(shift: Any) -> float:
    if isinstance(shift, bool) or not isinstance(shift, int | float | np.floating) or not 0 < shift < float("inf"):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    return float(shift)


def shift_timesteps(ts: Any, shift: float, config: DDPMWuerstchen) -> np.ndarray:
    """The original's GDF schedule shift, as timesteps of this sampler: float32 ``[S + 1]`` t' with
    ``alpha_cumprod(t') = sigmoid(clamp(logSNR(t) - 2·ln(shift)))``, logSNR(t) = logit(alpha_cumprod(t)) clamped to
    the unshifted range [logit(1e-4), logit(0.9999)] (GDF's ``CosineSchedule`` limits), and t' its cosine
    inverse (GDF's ``CosineTNoiseCond``): what the original's stage C sees as its noise ratio and steps with.
    Computed on the host in float64 (the original's is float32: they differ in the last bits)."""
    if config.scaler != 1:
        raise ValueError(f"shift needs the sampler's scaler 1 (Stable Cascade's), got {config.scaler}")
    t = np.asarray(ts, np.float64)
    s = config.s
    init = np.cos(s / (1 + s) * np.pi * 0.5) ** 2
    var = np.clip(np.cos((t + s) / (1 + s) * np.pi * 0.5) ** 2 / init, 1e-4, 0.9999)
    lo, hi = np.log(1e-4 / (1 - 1e-4)), np.log(0.9999 / (1 - 0.9999))
    log_snr = np.clip(np.log(var / (1 - var)) - 2 * np.log(shift), lo, hi)
    var = 1 / (1 + np.exp(-log_snr))
    return (np.arccos(np.sqrt(var * init)) / (np.pi * 0.5) * (1 + s) - s).astype(np.float32)


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
