"""Parity tests: wurst_jax.samplers.ddpm_wuerstchen vs diffusers' DDPMWuerstchenScheduler (CPU, float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import (
    DEFAULT_STAGE_C_TIMESTEPS as HF_DEFAULT_STAGE_C_TIMESTEPS,
)
from diffusers.schedulers import scheduling_ddpm_wuerstchen

from wurst_jax.samplers import ddpm_wuerstchen as sch


def _fake_model(x, t):
    """Deterministic stand-in for the denoiser; works on torch and numpy/jax arrays of shape [B, C, H, W]."""
    return 0.3 * x + t.reshape(-1, 1, 1, 1)


def test_default_stage_c_timesteps():
    assert len(sch.DEFAULT_STAGE_C_TIMESTEPS) == 30
    assert all(type(x) is float for x in sch.DEFAULT_STAGE_C_TIMESTEPS)
    assert list(sch.DEFAULT_STAGE_C_TIMESTEPS) == [float(x) for x in HF_DEFAULT_STAGE_C_TIMESTEPS]


@pytest.mark.parametrize("scaler", [1.0, 2.0, 0.5])
def test_alpha_cumprod(scaler):
    hf = DDPMWuerstchenScheduler(scaler=scaler, s=0.008)
    t = torch.linspace(0.0, 1.0, 1001)
    ref = hf._alpha_cumprod(t, "cpu").numpy()
    ours = np.asarray(sch.alpha_cumprod(t.numpy(), sch.DDPMWuerstchen(scaler=scaler, s=0.008)))
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("count", [None, 12, 3])
def test_timesteps(count):
    hf = DDPMWuerstchenScheduler()
    if count is None:
        hf.set_timesteps(timesteps=HF_DEFAULT_STAGE_C_TIMESTEPS)
        ours = sch.timesteps(timesteps=sch.DEFAULT_STAGE_C_TIMESTEPS)
    else:
        hf.set_timesteps(count)
        ours = sch.timesteps(count)
    assert ours.dtype == np.float32
    # torch.linspace may differ from numpy's by 1 ulp in float32
    np.testing.assert_allclose(ours, hf.timesteps.numpy(), rtol=0, atol=1e-7)


def _run_loop(ts_list, scaler, monkeypatch, shape=(2, 4, 6, 5)):
    cfg = sch.DDPMWuerstchen(scaler=scaler)
    hf = DDPMWuerstchenScheduler(scaler=scaler)
    hf.set_timesteps(timesteps=list(ts_list))
    ts = sch.timesteps(timesteps=ts_list)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noises = rng.standard_normal((len(ts) - 1, *shape)).astype(np.float32)

    current = {}
    monkeypatch.setattr(scheduling_ddpm_wuerstchen, "randn_tensor", lambda shp, **kw: current["noise"])
    x_hf, x_jax = torch.from_numpy(x0), jnp.asarray(x0)
    errs = []
    for i, t in enumerate(hf.timesteps[:-1]):
        ratio = t.expand(shape[0])
        current["noise"] = torch.from_numpy(noises[i])
        x_hf = hf.step(_fake_model(x_hf, ratio), ratio, x_hf).prev_sample
        tb = jnp.full((shape[0],), ts[i], jnp.float32)
        tpb = jnp.full((shape[0],), ts[i + 1], jnp.float32)
        x_jax = sch.step(_fake_model(x_jax, tb), tb, tpb, x_jax, jnp.asarray(noises[i]), cfg)
        ref = x_hf.numpy()
        err = np.abs(np.asarray(x_jax) - ref).max() / max(1.0, np.abs(ref).max())
        errs.append(err)
        assert err <= 1e-5, f"step {i}: rel err {err}"
    assert x_jax.dtype == jnp.float32
    return max(errs)


def test_step_loop_default_stage_c(monkeypatch):
    _run_loop(sch.DEFAULT_STAGE_C_TIMESTEPS, 1.0, monkeypatch)


def test_step_loop_12_steps_scaler(monkeypatch):
    _run_loop(sch.timesteps(12).tolist(), 2.0, monkeypatch)


def test_last_step_adds_no_noise():
    cfg = sch.DDPMWuerstchen()
    x = jnp.ones((2, 3, 3, 4))
    a = sch.step(0.1 * x, jnp.full((2,), 0.1), jnp.zeros((2,)), x, jnp.zeros_like(x), cfg)
    b = sch.step(0.1 * x, jnp.full((2,), 0.1), jnp.zeros((2,)), x, 100.0 * jnp.ones_like(x), cfg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_jit_and_per_batch_t():
    cfg = sch.DDPMWuerstchen(scaler=0.5)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 5, 5, 4)), jnp.float32)  # NHWC
    eps = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    t = jnp.array([0.9, 0.5, 0.2], jnp.float32)
    t_prev = jnp.array([0.8, 0.3, 0.0], jnp.float32)
    eager = sch.step(eps, t, t_prev, x, noise, cfg)
    jitted = jax.jit(functools.partial(sch.step, config=cfg))(eps, t, t_prev, x, noise)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    for b in range(3):  # each batch row equals a scalar-t step on that row alone
        row = sch.step(eps[b : b + 1], t[b], t_prev[b], x[b : b + 1], noise[b : b + 1], cfg)
        np.testing.assert_allclose(np.asarray(eager[b : b + 1]), np.asarray(row), rtol=1e-6, atol=1e-6)
    # bfloat16 input comes back as bfloat16
    assert sch.step(eps, t, t_prev, x.astype(jnp.bfloat16), noise, cfg).dtype == jnp.bfloat16


@pytest.mark.parametrize("scaler", [1.0, 2.0, 0.5])
def test_add_noise(scaler):
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([1.0, 0.7, 0.25, 0.0], np.float32)
    ref = DDPMWuerstchenScheduler(scaler=scaler).add_noise(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    )
    ours = sch.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), sch.DDPMWuerstchen(scaler=scaler))
    assert np.abs(np.asarray(ours) - ref.numpy()).max() <= 1e-6


def test_config_from_dict():
    d = {"_class_name": "DDPMWuerstchenScheduler", "_diffusers_version": "0.19.0", "scaler": 1.0, "s": 0.008}
    assert sch.DDPMWuerstchen.from_dict(d) == sch.DDPMWuerstchen()
    with pytest.raises(ValueError, match="scaler"):
        sch.DDPMWuerstchen.from_dict({"scaler": 0.0})
    with pytest.raises(ValueError, match="'s'"):
        sch.DDPMWuerstchen.from_dict({"s": -0.1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"timesteps": [1.0, 0.5, 0.7, 0.0]}, "timesteps"),
        ({"timesteps": [1.0, 0.5, 0.5, 0.0]}, "timesteps"),
        ({"timesteps": [1.5, 0.5, 0.0]}, "timesteps"),
        ({"timesteps": [1.0, float("nan"), 0.0]}, "timesteps"),
        ({"timesteps": [[1.0, 0.0]]}, "timesteps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -3}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({}, "num_inference_steps or timesteps"),
        ({"num_inference_steps": 4, "timesteps": [1.0, 0.0]}, "num_inference_steps or timesteps"),
    ],
)
def test_timesteps_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sch.timesteps(**kwargs)
