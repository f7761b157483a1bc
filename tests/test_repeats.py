"""`scan_blocks` / `remat` on the prior (`WuerstchenPrior`) and the decoder (`WuerstchenDiffNeXt`): the same
parameter tree and, in deterministic mode, the same function and gradients as the default unrolled blocks;
dropout draws from the "dropout" stream; a scanned, rematerialised train step runs FSDP-sharded on 8 devices with
the unsharded loss."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.models import abstract_variables
from wurst_jax.sharding import make_mesh
from wurst_jax.train import objectives
from wurst_jax.train.state import batch_sharding, create_state, make_optimizer, make_train_step, state_shardings

PRIOR = wj.StageCConfig(c_in=16, c=32, c_cond=24, c_r=8, depth=3, nhead=2, dropout=0.1)
# two levels (the smallest that has a skip): level 1 has three repeats, scanned down and (after the first, which
# takes the skip) two scanned up; more levels only add compile time (4 levels: 3x this file's time)
DECODER = dataclasses.replace(
    wj.StageBConfig.tiny(),
    c_hidden=(8, 16),
    nhead=(-1, 2),
    blocks=(1, 3),
    level_config=("CT", "CTA"),
    inject_effnet=(False, True),
    dropout=0.1,
)
OPTIONS = [dict(scan_blocks=True), dict(remat=True), dict(scan_blocks=True, remat=True)]


def inputs(stage: str, seed=0, b=2):
    rng = np.random.default_rng(seed)
    r = np.linspace(0.1, 0.9, b).astype(np.float32)
    if stage == "prior":
        x = rng.standard_normal((b, 5, 7, PRIOR.c_in), np.float32)
        return x, r, rng.standard_normal((b, 6, PRIOR.c_cond), np.float32)
    x = rng.standard_normal((b, 8, 12, DECODER.c_in), np.float32)  # multiples of downscale 4
    effnet = rng.standard_normal((b, 6, 6, DECODER.effnet_embd), np.float32)
    return x, r, effnet, rng.standard_normal((b, 5, DECODER.clip_embd), np.float32)


def model(stage: str, **options):
    return wj.WuerstchenPrior(PRIOR, **options) if stage == "prior" else wj.WuerstchenDiffNeXt(DECODER, **options)


def output_and_grad(stage, module, params):
    """The deterministic output and the gradients of its mean square, from one compiled program (one compile, not
    one for the output and another for the gradients)."""

    def f(p):
        out = module.apply({"params": p}, *inputs(stage))
        return jnp.mean(jnp.square(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return out, grads


@functools.cache
def reference(stage: str):
    """Random parameters (no zero-initialised leaf, so every block contributes), the default path's output and
    its gradients: computed once per stage."""
    tree = jax.jit(model(stage).init)(jax.random.key(0), *inputs(stage))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    return params, *output_and_grad(stage, model(stage), params)


@pytest.mark.parametrize("stage", ["prior", "decoder"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_same_tree_function_and_gradients(stage, options):
    params, want, g_want = reference(stage)
    module = model(stage, **options)
    same_tree = jax.tree_util.tree_structure(abstract_variables(model(stage)))
    assert jax.tree_util.tree_structure(abstract_variables(module)) == same_tree
    got, g_got = output_and_grad(stage, module, params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_want))  # to_k's bias: exactly 0
    pairs = zip(jax.tree_util.tree_leaves_with_path(g_want), jax.tree_util.tree_leaves(g_got), strict=True)
    for (path, want_g), got_g in pairs:
        np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage,options", [("prior", o) for o in OPTIONS] + [("decoder", OPTIONS[-1])], ids=str)
def test_dropout_uses_the_dropout_stream(stage, options):
    params, clean, _ = reference(stage)
    module = model(stage, **options)

    def f(p, key):  # the output and (below) its gradients from one compiled program
        out = module.apply({"params": p}, *inputs(stage), deterministic=False, rngs={"dropout": key})
        return jnp.mean(jnp.square(out)), out

    run = jax.jit(jax.value_and_grad(f, has_aux=True))
    ((_, a), grads), ((_, b), _), ((_, again), _) = (run(params, jax.random.key(k)) for k in (1, 2, 1))
    assert np.isfinite(a).all() and not np.allclose(a, b) and not np.allclose(a, clean)
    np.testing.assert_array_equal(a, again)  # a function of the key alone
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_scanned_remat_train_step_fsdp_matches_one_device():
    """bf16 compute, f32 masters, dropout off: the FSDP-sharded step on 8 devices gives the one-device loss."""
    cfg = wj.StageCConfig(c_in=16, c=32, c_cond=32, c_r=8, depth=3, nhead=2, dropout=0.0)
    module = wj.WuerstchenPrior(cfg, dtype=jnp.bfloat16, scan_blocks=True, remat=True)
    tx = make_optimizer(1e-3, 10)
    rng = np.random.default_rng(0)
    batch = {
        "latents": rng.standard_normal((8, 4, 4, 16), np.float32),
        "clip": rng.standard_normal((8, 6, 32), np.float32),
    }
    step = make_train_step(
        lambda p, s, key, b: (objectives.stage_c_loss(module, p, key, b["latents"], b["clip"]), {}), tx, 0.99
    )
    example = (batch["latents"][:1], np.zeros(1, np.float32), batch["clip"][:1])
    state = create_state(wj.WuerstchenPrior(cfg).init(jax.random.key(0), *example)["params"], tx, 0)
    s1, m1 = jax.jit(step)(state, batch)
    mesh = make_mesh(data=-1, model=1)
    boxed = abstract_variables(module, boxed=True)["params"]
    state_sh = state_shardings(jax.eval_shape(lambda: state), boxed, mesh, "fsdp")
    batch_sh = jax.tree_util.tree_map(batch_sharding(mesh), batch)
    sharded = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
    s8, m8 = sharded(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh))
    assert np.isfinite(float(m1["loss"]))
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-3)
    for a, b in zip(jax.tree_util.tree_leaves(s8.params), jax.tree_util.tree_leaves(s1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=2e-4)
