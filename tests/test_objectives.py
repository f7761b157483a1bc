"""The training objectives' weights and noise-ratio sampling (the losses themselves run in test_train.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wurst_jax.samplers import ddpm_wuerstchen as sched
from wurst_jax.train import objectives

CFG = sched.DDPMWuerstchen()


def test_p2_weight_is_one_over_one_plus_snr():
    t = jnp.linspace(0.01, 1.0, 50)
    ac = np.asarray(sched.alpha_cumprod(t, CFG), np.float64)
    np.testing.assert_allclose(objectives.p2_weight(t, CFG), 1 / (1 + ac / (1 - ac)), rtol=1e-5)


def test_v_weighting_is_the_mse_of_v_where_uncapped():
    """ε-MSE / ᾱ equals the MSE of the v implied by the ε prediction (v = √ᾱ ε - √(1-ᾱ) x)."""
    k = jax.random.split(jax.random.key(0), 3)
    x, eps = jax.random.normal(k[0], (6, 4, 4, 16)), jax.random.normal(k[1], (6, 4, 4, 16))
    eps_hat = eps + 0.3 * jax.random.normal(k[2], eps.shape)
    t = jnp.array([0.05, 0.2, 0.4, 0.6, 0.7, 0.8])  # ᾱ ≥ 1/20 here: the cap does not bite
    ac = sched.alpha_cumprod(t, CFG)[:, None, None, None]
    assert float(ac.min()) > 1 / 20
    x_t = jnp.sqrt(ac) * x + jnp.sqrt(1 - ac) * eps
    x_hat = (x_t - jnp.sqrt(1 - ac) * eps_hat) / jnp.sqrt(ac)
    v, v_hat = jnp.sqrt(ac) * eps - jnp.sqrt(1 - ac) * x, jnp.sqrt(ac) * eps_hat - jnp.sqrt(1 - ac) * x_hat
    want = jnp.mean(jnp.square(v_hat - v))
    got = objectives._diffusion_loss(eps_hat, eps, t, CFG, "v")
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_v_weight_is_capped_at_pure_noise_and_weights_noise_above_p2():
    t = jnp.array([0.1, 0.5, 0.9, 1.0])
    v, p2 = objectives.v_weight(t, CFG), objectives.p2_weight(t, CFG)
    assert float(v[-1]) == pytest.approx(20.0)
    assert np.all(np.diff(np.asarray(v)) >= 0) and np.all(np.diff(np.asarray(p2)) >= 0)
    assert float(v[2] / v[1]) > 5 * float(p2[2] / p2[1])  # t 0.5 → 0.9: p2 (= 1 - ᾱ) barely grows, v by > 10×


def test_unknown_weighting_is_refused():
    z = jnp.zeros((2, 4, 4, 16))
    with pytest.raises(ValueError, match="weighting must be one of"):
        objectives._diffusion_loss(z, z, jnp.ones(2), CFG, "snr")


@pytest.mark.parametrize(("stage", "hi"), [("c", 1.0), ("b", 1.0)])
def test_noise_ratios_lie_in_range_and_stage_c_piles_up_at_one(stage, hi):
    t = np.asarray(objectives.sample_t(jax.random.key(1), 20000, stage))
    assert t.min() >= 0.001 and t.max() <= hi
    at_one = np.mean(t == 1.0)
    if stage == "c":  # (1 - u) · 1.08 + 0.001 ≥ 1 for u ≤ 0.0750
        assert 0.06 < at_one < 0.09
    else:
        assert at_one < 0.01
