"""Training: the losses fall, a resumed run continues bit for bit, the sharded step equals the unsharded one."""

import dataclasses

import jax
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.tiny.recipe import (
    TinyConfig,
    _Batches,
    init_variables,
    modules,
    stage_loss,
    tiny_config,
    trainable,
)
from wurst_jax.train.config import RunConfig
from wurst_jax.train.state import (
    Checkpoints,
    batch_sharding,
    create_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
    state_shardings,
)

TINY = TinyConfig(
    size=32,
    stage_a=wj.StageAConfig(bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=32),
    stage_b=dataclasses.replace(
        TinyConfig().stage_b, c_hidden=(8, 16, 16), nhead=(-1, 2, 2), blocks=(1, 1, 1), c_cond=16, clip_embd=16
    ),
    stage_c=wj.StageCConfig(c_in=16, c=32, c_cond=16, c_r=16, depth=1, nhead=2, dropout=0.0),
    text=wj.CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ),
)
RUN = RunConfig(lr=2e-3, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny():
    mods = modules(TINY)
    return mods, init_variables(TINY, mods)


def batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.random((n, 32, 32, 3), dtype=np.float32),
        "ids": rng.integers(0, 100, (n, 77)).astype(np.int32),
        "mask": (np.arange(77)[None] < rng.integers(2, 20, (n, 1))).astype(np.int32),
    }


def trainer(stage, tiny, ema_decay=0.99):
    mods, variables = tiny
    empty = (np.zeros((1, 77), np.int32), np.ones((1, 77), np.int32))
    loss = stage_loss(stage, TINY, mods, variables, RUN, empty)
    tx = make_optimizer(RUN.lr, RUN.warmup_steps)
    params, stats = trainable(stage, variables)
    return make_train_step(loss, tx, ema_decay), create_state(params, tx, seed=0, batch_stats=stats)


@pytest.mark.parametrize("stage", ["a", "b", "c"])
def test_a_few_steps_lower_the_loss(tiny, stage):
    step, state = trainer(stage, tiny)
    step = jit_train_step(step)
    fixed = batch(0)
    losses = []
    for _ in range(40):
        state, m = step(state, fixed)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert int(state.step) == 40


def test_save_and_resume_continue_bit_identically(tiny, tmp_path):
    step, state0 = trainer("b", tiny)
    step = jax.jit(step)  # no donation: state0 is reused below
    straight = state0
    for k in range(6):
        straight, _ = step(straight, batch(k))
    half = state0
    for k in range(3):
        half, _ = step(half, batch(k))
    Checkpoints(tmp_path / "ckpt").save(half)
    resumed = Checkpoints(tmp_path / "ckpt").restore(state0)
    assert int(resumed.step) == 3
    for k in range(3, 6):
        resumed, _ = step(resumed, batch(k))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(straight), jax.device_get(resumed))


@pytest.mark.parametrize("mode", ["dp", "fsdp"])
def test_sharded_train_step_equals_unsharded(tiny, mode):
    mods, _ = tiny
    step, state = trainer("c", tiny)
    _, want = jax.jit(step)(state, batch(1))
    mesh = wj.make_mesh()
    boxed = {
        "prior": wj.models.abstract_variables(mods["prior"], boxed=True)["params"],
        "text": wj.models.abstract_variables(mods["text"], boxed=True)["params"],
    }
    sh = state_shardings(jax.eval_shape(lambda: state), boxed, mesh, mode)
    placed = jax.device_put(state, sh)
    b = batch(1)
    b_sh = jax.tree_util.tree_map(batch_sharding(mesh), b)
    new, got = jit_train_step(step, sh, b_sh)(placed, jax.device_put(b, b_sh))
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    leaf = new.params["prior"]["blocks_0"]["channelwise_0"]["kernel"]
    P = jax.sharding.PartitionSpec
    assert leaf.sharding.spec == (P() if mode == "dp" else P(None, ("data", "model")))
    moments = [  # Adam's first and second moments of that kernel follow its sharding
        x
        for path, x in jax.tree_util.tree_leaves_with_path(new.opt_state)
        if "prior" in jax.tree_util.keystr(path) and "blocks_0']['channelwise_0']['kernel" in jax.tree_util.keystr(path)
    ]
    assert len(moments) == 2 and all(m.sharding.spec == leaf.sharding.spec for m in moments)


def test_tiny_config_from_a_model_section():
    cfg = tiny_config({"semantic_widths": [32, 64, 128], "stage_b": {"patch_size": 1}, "stage_c": {"c": 64}}, 32)
    assert (cfg.size, cfg.semantic_widths, cfg.resolution_multiple, cfg.latent_dim_scale) == (32, (32, 64, 128), 8, 2)
    assert (cfg.stage_b.patch_size, cfg.stage_c.c, cfg.stage_c.depth) == (1, 64, TinyConfig().stage_c.depth)
    assert tiny_config() == TinyConfig()
    with pytest.raises(ValueError, match="'model.text': unknown keys"):
        tiny_config({"text": {"layers": 3}})


def test_prefetching_workers_make_the_same_batches():
    from transformers import AutoTokenizer

    from wurst_jax.tiny.data import batches
    from wurst_jax.train.cli import ASSETS

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    here, pool = _Batches(tok, 32, 4, seed=3), _Batches(tok, 32, 4, seed=3, workers=2)
    try:
        for k in (5, 6, 9):  # a resumed run starts anywhere
            a, b = here(k), pool(k)
            for key in ("images", "ids", "mask"):
                np.testing.assert_array_equal(a[key], b[key])
            assert a["images"].dtype == np.float32
            np.testing.assert_array_equal(a["images"], next(batches(3 * 1_000_003 + k, 4, size=32))["images"])
    finally:
        pool.close()
