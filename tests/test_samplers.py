"""The sampler protocol and `denoise_loop`: from t = 1 it is exactly the loops the pipelines ran before the loop
was shared; from t_start < 1 it is the sampler's forward noising followed by the remaining steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.pipelines.runner import run_loop
from wurst_jax.pipelines.wuerstchen import decoder_model, prior_model
from wurst_jax.samplers import DDPMWuerstchen, denoise_loop, sampler_from_config
from wurst_jax.samplers import ddpm_wuerstchen as sched


def _old_prior_loop(module, variables, latents, timesteps, step_noise, clip, guidance, config, use_cfg):
    """The prior loop as `wurst_jax.sampling.prior_loop` was written before `denoise_loop` (kept as the oracle)."""

    def body(i, x):
        r = jnp.full((x.shape[0],), timesteps[i], jnp.float32)
        if use_cfg:
            out = module.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([r, r]), clip)
            cond, uncond = jnp.split(out.astype(jnp.float32), 2, axis=0)
            out = uncond + guidance * (cond - uncond)
        else:
            out = module.apply(variables, x, r, clip).astype(jnp.float32)
        return sched.step(out, r, jnp.full_like(r, timesteps[i + 1]), x, step_noise[i], config)

    return jax.lax.fori_loop(0, step_noise.shape[0], body, latents.astype(jnp.float32))


def _old_decoder_loop(module, variables, latents, timesteps, step_noise, effnet, clip, guidance, config, use_cfg):
    if use_cfg:
        effnet = jnp.concatenate([effnet, jnp.zeros_like(effnet)])

    def body(i, x):
        r = jnp.full((x.shape[0],), timesteps[i], jnp.float32)
        if use_cfg:
            out = module.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([r, r]), effnet, clip)
            cond, uncond = jnp.split(out.astype(jnp.float32), 2, axis=0)
            out = uncond + guidance * (cond - uncond)
        else:
            out = module.apply(variables, x, r, effnet, clip).astype(jnp.float32)
        return sched.step(out, r, jnp.full_like(r, timesteps[i + 1]), x, step_noise[i], config)

    return jax.lax.fori_loop(0, step_noise.shape[0], body, latents.astype(jnp.float32))


@pytest.fixture(scope="module")
def prior():
    module = wj.WuerstchenPrior(wj.StageCConfig.tiny())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 16)), jnp.float32)
    clip = jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32)
    variables = module.init(jax.random.key(1), x, jnp.ones((2,)), clip)
    # a non-trivial output head (diffusers zero-initialises it)
    variables = jax.tree_util.tree_map(lambda v: v + 0.05 * jnp.sin(jnp.arange(v.size).reshape(v.shape)), variables)
    return module, variables, x, clip, rng


@pytest.mark.parametrize("use_cfg", [False, True])
def test_from_t1_equals_the_old_prior_loop(prior, use_cfg):
    module, variables, x, clip, rng = prior
    sampler = DDPMWuerstchen()
    ts = jnp.asarray(sampler.timesteps(timesteps=wj.DEFAULT_STAGE_C_TIMESTEPS[:6] + (0.0,)))
    eps = jnp.asarray(rng.standard_normal((len(ts) - 1, *x.shape)), jnp.float32)
    uncond = jnp.asarray(rng.standard_normal(clip.shape), jnp.float32)
    w = jnp.float32(3.0)
    clip_in = jnp.concatenate([clip, uncond]) if use_cfg else clip
    old_loop = jax.jit(_old_prior_loop, static_argnums=(0, 7, 8))
    old = old_loop(module, variables, x, ts, eps, clip_in, w, sampler, use_cfg)
    kw = dict(module=module, model_fn=prior_model, sampler=sampler)
    new = jax.jit(run_loop, static_argnames=tuple(kw))(
        variables, x, ts, eps, {"clip": clip}, {"clip": uncond} if use_cfg else None, w, None, **kw
    )
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_from_t1_equals_the_old_decoder_loop():
    module = wj.WuerstchenDiffNeXt(wj.StageBConfig.tiny())
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    effnet = jnp.asarray(rng.standard_normal((2, 3, 3, 16)), jnp.float32)
    clip = jnp.asarray(rng.standard_normal((4, 5, 24)), jnp.float32)
    variables = module.init(jax.random.key(2), x, jnp.ones((2,)), effnet, clip[:2])
    sampler = DDPMWuerstchen(scaler=2.0)
    ts = jnp.asarray(sampler.timesteps(3))
    eps = jnp.asarray(rng.standard_normal((3, *x.shape)), jnp.float32)
    w = jnp.float32(2.5)
    old_loop = jax.jit(_old_decoder_loop, static_argnums=(0, 8, 9))
    old = old_loop(module, variables, x, ts, eps, effnet, clip, w, sampler, True)
    kw = dict(module=module, model_fn=decoder_model, sampler=sampler)
    cond, uncond = {"effnet": effnet, "clip": clip[:2]}, {"effnet": jnp.zeros_like(effnet), "clip": clip[2:]}
    new = jax.jit(run_loop, static_argnames=tuple(kw))(variables, x, ts, eps, cond, uncond, w, None, **kw)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_partial_start_is_forward_noising_then_the_remaining_steps(prior):
    module, variables, x0, clip, rng = prior
    sampler = DDPMWuerstchen()
    full = sampler.timesteps(10)
    ts = sampler.timesteps(10, t_start=0.6)
    np.testing.assert_allclose(ts, np.linspace(0.6, 0.0, 11), rtol=0, atol=1e-7)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((len(ts) - 1, *x0.shape)), jnp.float32)
    model = lambda x, r, c: module.apply(variables, x, r, c["clip"])  # noqa: E731
    got = jax.jit(lambda *a: denoise_loop(model, {"clip": clip}, sampler, *a))(jnp.asarray(ts), noise, eps, x0)
    # the same, written out: forward noising to ts[0], then one sampler step per remaining timestep
    x = sampler.add_noise(x0, noise, jnp.full((2,), ts[0]))
    for i in range(len(ts) - 1):
        r = jnp.full((2,), ts[i], jnp.float32)
        x = sampler.step(model(x, r, {"clip": clip}), r, jnp.full((2,), ts[i + 1]), x, eps[i])
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)
    # and t_start = 1 without x_init starts from the noise itself: the text-to-image loop
    plain = jax.jit(lambda *a: denoise_loop(model, {"clip": clip}, sampler, *a))(jnp.asarray(full), noise, eps)
    assert np.isfinite(np.asarray(plain)).all() and not np.allclose(np.asarray(plain), np.asarray(got))


def test_truncated_custom_schedule_and_bad_t_start():
    sampler = DDPMWuerstchen()
    ts = sampler.timesteps(timesteps=wj.DEFAULT_STAGE_C_TIMESTEPS, t_start=0.5)
    assert ts[0] == np.float32(0.5) and np.all(np.diff(ts) < 0) and ts[-1] == 0.0
    full = sampler.timesteps(timesteps=wj.DEFAULT_STAGE_C_TIMESTEPS)
    np.testing.assert_array_equal(ts[1:], full[full < 0.5])
    np.testing.assert_array_equal(sampler.timesteps(timesteps=wj.DEFAULT_STAGE_C_TIMESTEPS, t_start=1.0), full)
    for bad in (0.0, 1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="t_start"):
            sampler.timesteps(10, t_start=bad)


def test_sampler_protocol_and_config():
    sampler = sampler_from_config({"_class_name": "DDPMWuerstchenScheduler", "scaler": 1.0, "s": 0.008})
    assert isinstance(sampler, DDPMWuerstchen)
    assert hash(sampler) == hash(DDPMWuerstchen()) and sampler == DDPMWuerstchen()
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        sampler_from_config({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        DDPMWuerstchen.from_dict({"_class_name": "EulerDiscreteScheduler"})
