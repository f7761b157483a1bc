"""`build_train_setup` with a trainable mask: only the selected leaves train, and the optimizer state and the EMA
hold only those; the frozen ones come back bit-equal and are never donated; FSDP on 8 devices gives the one-device
loss; a run resumed from a checkpoint (which leaves the frozen leaves out) continues bit for bit."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import wurst_jax as wj
from wurst_jax.models import abstract_variables
from wurst_jax.sharding import param_specs
from wurst_jax.train import objectives
from wurst_jax.train.config import RunConfig
from wurst_jax.train.setup import build_train_setup
from wurst_jax.train.state import Checkpoints, batch_sharding, merge_params, split_params

PRIOR = wj.StageCConfig(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=2, dropout=0.0)
RUN = RunConfig(lr=1e-2, warmup_steps=1, ema_decay=0.9, seed=3)


def attention_only(path: tuple[str, ...]) -> bool:
    """The attention's weight matrices, as a LoRA of the attention trains (say). Not the biases: to_k's gets no
    gradient (softmax ignores a per-query constant), and Adam would blow rounding noise up to full steps."""
    return "attention" in path and path[-1] == "kernel"


@pytest.fixture(scope="module")
def prior():
    module = wj.WuerstchenPrior(PRIOR)
    tree = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *abstract_inputs(module))["params"])
    leaves, treedef = jax.tree_util.tree_flatten(tree)  # no zero-initialised leaf: every one gets a gradient
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])
    empty = np.zeros((1, 6, PRIOR.c_cond), np.float32)
    return module, {"params": params}, objectives.component_loss("c", module, empty, cond_dropout=0.5)


def abstract_inputs(module):
    return [np.zeros(x.shape, x.dtype) for x in wj.models.example_inputs(module)]


def batch(k: int) -> dict:
    rng = np.random.default_rng(k)
    return {
        "latents": rng.standard_normal((8, 4, 4, 16), np.float32),
        "clip": rng.standard_normal((8, 6, PRIOR.c_cond), np.float32),
    }


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def test_masked_steps_train_only_the_selected_leaves(prior):
    module, variables, loss = prior
    setup = build_train_setup(loss, variables, RUN, trainable=attention_only)
    everything, state = flat(variables["params"]), setup.state
    trained = {p for p in everything if attention_only(p)}
    assert 0 < len(trained) < len(everything)
    assert set(flat(state.params)) == trained and set(flat(state.ema)) == trained
    assert set(flat(state.frozen)) == set(everything) - trained
    # the optimizer state: Adam's two moments of each trained leaf, and nothing shaped like a frozen one
    moments = [
        tuple(k.key for k in path if hasattr(k, "key"))
        for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if x.ndim > 0
    ]
    assert sorted(moments) == sorted([p for p in trained] * 2)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    assert n_opt < 2 * sum(everything[p].size for p in trained) + 8  # + the step counters

    for k in range(3):
        state, metrics = setup.step(state, batch(k))
        assert np.isfinite(float(metrics["loss"]))
    for path in set(everything) - trained:  # carried bit-equal; the caller's arrays were not donated
        assert not everything[path].is_deleted()
        np.testing.assert_array_equal(flat(state.frozen)[path], everything[path])
    changed = [not np.array_equal(flat(state.params)[p], everything[p]) for p in trained]
    assert all(changed)
    whole = merge_params(state.ema, state.frozen)
    assert jax.tree_util.tree_structure(whole) == jax.tree_util.tree_structure(variables["params"])

    # the mask as a tree of bools: the same split
    mask = jax.tree_util.tree_map_with_path(lambda p, _: attention_only(tuple(k.key for k in p)), variables["params"])
    a, f = split_params(variables["params"], mask)
    assert set(flat(a)) == trained and set(flat(f)) == set(everything) - trained
    with pytest.raises(ValueError, match="does not match the parameters' paths"):
        split_params(variables["params"], {"blocks_0": True})


def test_masked_fsdp_step_equals_one_device(prior):
    module, variables, loss = prior
    one = build_train_setup(loss, variables, RUN, trainable=attention_only)
    mesh = wj.make_mesh()
    sharded = build_train_setup(loss, variables, RUN, module=module, mesh=mesh, mode="fsdp", trainable=attention_only)
    specs = param_specs(abstract_variables(module, boxed=True), mesh, "fsdp")["params"]
    for path, x in flat(sharded.state.frozen).items():  # the frozen leaves placed as FSDP splits them
        assert x.sharding.spec == flat(specs)[path]
    assert sharded.state.frozen["out_1"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    s1, s8 = one.state, sharded.state
    for k in range(2):
        s1, m1 = one.step(s1, batch(k))
        b = jax.device_put(batch(k), jax.tree_util.tree_map(batch_sharding(mesh), batch(k)))
        s8, m8 = sharded.step(s8, b)
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    # after two Adam steps (lr 1e-2): Adam divides each gradient element by its own RMS, so an element whose
    # gradient is near rounding noise moves by a different fraction of lr; measured at most 4e-6
    for a, b in zip(jax.tree_util.tree_leaves(s8.params), jax.tree_util.tree_leaves(s1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s8.frozen), jax.tree_util.tree_leaves(s1.frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_masked_resume_is_bit_identical(prior, tmp_path):
    module, variables, loss = prior
    setup = build_train_setup(loss, variables, RUN, trainable=attention_only, allocate=False)
    straight = setup.make_state(variables)
    for k in range(6):
        straight, _ = setup.step(straight, batch(k))
    half = setup.make_state(variables)
    for k in range(3):
        half, _ = setup.step(half, batch(k))
    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(half)
    saved = ckpts.manager.item_metadata(3)
    assert "frozen" not in saved and set(flat(dict(saved["params"]))) == set(flat(half.params))  # trained only
    resumed = ckpts.restore(setup.make_state(variables))
    assert int(resumed.step) == 3
    for k in range(3, 6):
        resumed, _ = setup.step(resumed, batch(k))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(straight), jax.device_get(resumed))
