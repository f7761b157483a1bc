"""LoRA training with `sharding` (the fine-tune path, `wurst_jax.train.finetune`) on the 8 fake CPU devices: a
Stable Cascade stage C LoRA trained 2 steps in "dp" and "fsdp" gives the one-device run's losses and adapter (f32),
the frozen weights stay bit-equal (and split as a full fine-tune splits them), the adapter leaves and their
optimizer state are replicated, and the saved `lora.safetensors` has the same keys, shapes and dtypes."""

import numpy as np
import pytest
from cascade_checkpoints import TEXT, mini_prior, unet
from conftest import clip_tokenizer, randomize
from safetensors.numpy import load_file
from test_finetune import config, metrics, prior_shard

import wurst_jax as wj
from wurst_jax.train import finetune as finetune_module
from wurst_jax.train.config import finetune_config, read_config

SETTINGS = dict(steps=2, batch_size=8, lr=1e-2, warmup_steps=0, ema_decay=0.0, lora_rank=2, ckpt_every=2)


def mini_sc_prior(root):
    """A Stable Cascade prior pipeline folder with the one-level `mini_prior` (the cheapest training compile)."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)), 1, 0.1)
    tok, prior = clip_tokenizer(root / "tok"), unet(mini_prior(), 4)
    StableCascadePriorPipeline(tok, te, prior, DDPMWuerstchenScheduler()).save_pretrained(root / "prior")
    return root / "prior"


def run_finetune(tmp, init, data, monkeypatch, argv=(), **settings):
    """`finetune` of a config written to `tmp` (through `wurst-jax train` when `argv` has flags); returns (out,
    the final train state)."""
    from wurst_jax.cli import main

    seen = {}
    loop = finetune_module.train_loop

    def keep(*args, **kw):
        seen["state"] = loop(*args, **kw)
        return seen["state"]

    monkeypatch.setattr(finetune_module, "train_loop", keep)
    path = config(tmp, init, data, **settings)
    if argv:
        assert main(["train", "--stage", "c", "--config", path, *argv]) == 0
    else:
        finetune_module.finetune(finetune_config(read_config(path), "c", path), log=lambda _: None)
    return tmp / "out", seen["state"]


@pytest.fixture(scope="module")
def sc_prior(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc_lora_sharded")
    prior_shard(root / "data" / "shard-000.npz")
    return mini_sc_prior(root), root / "data"


def test_sharded_lora_matches_one_device(sc_prior, tmp_path, monkeypatch):
    import jax

    init, data = sc_prior
    runs = {}
    for mode in (None, "dp", "fsdp"):
        extra = {"sharding": mode} if mode else {}
        runs[mode] = run_finetune(tmp_path / str(mode), init, data, monkeypatch, **SETTINGS, **extra)
    base = jax.tree_util.tree_leaves(wj.load_component(init / "prior")[1]["params"])
    one_out, one_state = runs[None]
    want = load_file(str(one_out / "lora.safetensors"))
    assert any(np.abs(want[k]).max() > 0 for k in want if k.endswith("lora_down"))  # trained (zeros at step 0)
    for mode in ("dp", "fsdp"):
        out, state = runs[mode]
        got = load_file(str(out / "lora.safetensors"))
        assert sorted(got) == sorted(want)
        assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
        err = max(float(np.abs(got[k].astype(np.float64) - want[k]).max(initial=0)) for k in want)
        losses = [m["loss"] for m in metrics(out)], [m["loss"] for m in metrics(one_out)]
        print(f"{mode}: adapter max|Δ| {err:.2e}, losses {losses[0]} vs {losses[1]}")
        assert err <= 1e-5
        np.testing.assert_allclose(*losses, rtol=1e-5)
        frozen = jax.tree_util.tree_leaves(state.frozen)
        assert len(frozen) == len(base) and all(np.array_equal(a, b) for a, b in zip(frozen, base, strict=True))
        split = [not x.sharding.is_fully_replicated for x in frozen]
        assert any(split) == (mode == "fsdp")  # fsdp splits the frozen kernels, as a full fine-tune does
        adapter = jax.tree_util.tree_leaves((state.params, state.opt_state, state.ema))
        assert all(x.sharding.is_fully_replicated for x in adapter if np.ndim(x))  # replicated: see finetune.py
        n_lora = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        assert sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x)) == 2 * n_lora
