"""Stable Cascade stage C LoRA training through the fine-tune path (`wurst_jax.train.finetune`) on the 8 fake CPU
devices, with ReToken rows (`train_tokens`, the original `train/train_c_lora.py`'s) and `sharding`:

- one run (through `wurst-jax train --train-tokens`) adds `[fern]` to the tokenizer (init row: the mean of
  `^dog</w>`'s rows) and trains the LoRA and rows for `[fern]` and the existing `cat</w>`; its `lora.safetensors`
  loaded back as `wurst-jax generate --lora FILE --train-tokens ...` loads it (`load_lora_weights(...,
  train_tokens=...)`) gives the trained text encoder's states;
- the same run in "dp" and in "fsdp" gives the one-device losses and saved tensors (f32); the frozen weights stay
  bit-equal (split over the devices in fsdp, as a full fine-tune splits them, the grown token table included); the
  adapter leaves and their optimizer state are replicated, and the optimizer holds them only.
One configuration for all three runs (a ReToken run trains the LoRA too): each training compile costs seconds.
"""

import jax
import numpy as np
import pytest
from cascade_checkpoints import TEXT, mini_prior, unet
from conftest import clip_tokenizer, randomize, rel_err
from safetensors.numpy import load_file
from test_finetune import config, metrics, write_shard

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.cli.lora_flags import load_loras, lora_options
from wurst_jax.train import finetune as finetune_module
from wurst_jax.train.config import finetune_config, read_config

SETTINGS = dict(steps=2, batch_size=8, lr=1e-2, warmup_steps=0, ema_decay=0.0, lora_rank=2, ckpt_every=2)
CAPTIONS = ["a photo of [fern] on a hill", "a cat and [fern]", "a red circle", "[fern] with a dog"]
TOKENS = [["[fern]", "^dog</w>"], ["^cat</w>", None]]  # [fern] is added (id 49408); cat</w> (2368) exists
FLAGS = ["--train-tokens", "[fern],^dog</w>", "--train-tokens", "^cat</w>"]


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
def runs(tmp_path_factory):
    """The prior folder and the LoRA + ReToken run on one device (CLI flags), in dp and in fsdp (config key)."""
    root = tmp_path_factory.mktemp("sc_lora_sharded")
    x = np.random.default_rng(0).standard_normal((4, 4, 4, 16)).astype(np.float32)
    write_shard(root / "data" / "shard-000.npz", captions=np.array(CAPTIONS), image_embeddings=x)
    init = mini_sc_prior(root)
    out = {"init": init}
    with pytest.MonkeyPatch.context() as mp:
        for mode, argv in ((None, FLAGS), ("dp", ()), ("fsdp", ())):
            extra = {} if mode is None else {"sharding": mode, "train_tokens": TOKENS}
            out[mode] = run_finetune(root / str(mode), init, root / "data", mp, argv, **SETTINGS, **extra)
    return out


@pytest.mark.parametrize("sharded", ["dp", "fsdp"])
def test_sharded_lora_matches_one_device(runs, sharded):
    (one_out, _), (out, state) = runs[None], runs[sharded]
    want, got = load_file(str(one_out / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    assert any(np.abs(want[k]).max() > 0 for k in want if k.endswith("lora_down"))  # trained (zeros at step 0)
    assert sorted(got) == sorted(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    err = max(float(np.abs(got[k].astype(np.float64) - want[k]).max(initial=0)) for k in want)
    losses = [m["loss"] for m in metrics(out)], [m["loss"] for m in metrics(one_out)]
    print(f"{sharded}: saved tensors max|Δ| {err:.2e}, losses {losses[0]} vs {losses[1]}")
    assert err <= 1e-5
    np.testing.assert_allclose(*losses, rtol=1e-5)
    assert np.array_equal(got["embeddings.indices"], want["embeddings.indices"])

    frozen = traverse(state.frozen)
    base = traverse(wj.load_component(runs["init"] / "prior")[1]["params"])
    assert all(np.array_equal(frozen[p], x) for p, x in base.items())  # the prior's weights, bit for bit
    split = [not x.sharding.is_fully_replicated for x in frozen.values()]
    assert any(split) == (sharded == "fsdp")  # fsdp splits the frozen kernels, as a full fine-tune does
    adapter = jax.tree_util.tree_leaves((state.params, state.opt_state, state.ema))
    assert all(x.sharding.is_fully_replicated for x in adapter if np.ndim(x))  # replicated: see finetune.py
    n_trained = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    assert sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x)) == 2 * n_trained


def traverse(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def test_retoken_rows_train_save_and_load_back(runs):
    from wurst_jax.lora import retoken_train as rt
    from wurst_jax.pipelines.tokenizer import load_tokenizer
    from wurst_jax.train.state import merge_params

    init, (out, state) = runs["init"], runs[None]
    saved = load_file(str(out / "lora.safetensors"))
    ids, rows = saved["embeddings.indices"], saved["embeddings.embeddings"]
    assert ids.tolist() == [2368, 49408] and rows.shape == (2, TEXT["hidden_size"])
    assert np.all(np.abs(rows).max(axis=1) > 1e-3)  # both rows trained (zeros at step 0)
    trained = traverse(state.params)
    leaves = {"sc_lora_down", "sc_lora_up", "in_proj_sc_lora_down", "in_proj_sc_lora_up", rt.ROWS}
    assert {p[-1] for p in trained} == leaves

    # the trained text encoder: the grown table plus the rows, as the loss ran it
    text, text_vars = wj.load_component(init / "text_encoder")
    tokenizer = load_tokenizer(init / "tokenizer")
    text, _ = rt.grow(tokenizer, text, text_vars["params"], TOKENS)
    tokenizer = rt.plan(tokenizer, TOKENS)[0]
    params = merge_params(state.params, state.frozen)[rt.TEXT]
    enc = tokenizer(CAPTIONS[1:2], padding="max_length", max_length=77, truncation=True, return_tensors="np")
    want = text.apply({"params": rt.encoder_params(params, ids)}, enc.input_ids, enc.attention_mask)
    assert 49408 in enc.input_ids[0]

    pipe = wj.StableCascadePriorPipeline.from_pretrained(init, progress=False)
    # loaded as `wurst-jax generate --lora FILE --train-tokens ...` loads it (the flags parsed by generate's parser)
    entries = lora_options(generate_args("--lora", f"{out / 'lora.safetensors'}:1", *FLAGS), cascade=True)
    assert entries == [(out / "lora.safetensors", 1.0, TOKENS)]
    load_loras(pipe, entries)
    assert np.array_equal(pipe.text.tokenizer(CAPTIONS[1], return_tensors="np").input_ids[0], enc.input_ids[0][:6])
    states, pooled = pipe.text.with_pooled(CAPTIONS[1:2])
    errs = rel_err(states, want.hidden_states_last), rel_err(pooled[:, 0], want.text_embeds)
    print(f"ReToken round trip: states / pooled rel err {errs[0]:.2e} / {errs[1]:.2e}")
    assert max(errs) <= 1e-6


def generate_args(*argv):
    import argparse

    from wurst_jax.cli.generate import add_generate_parser

    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", "a prompt", *argv])


def test_train_tokens_bad_input_is_one_line(runs, tmp_path, capsys):
    """Refused before any weights are read (no data shard needed for any of these)."""
    cases = [
        (["--lora-rank", "2", "--train-tokens", ",^dog</w>"], "--train-tokens: expected TOKEN or TOKEN,REGEX"),
        (["--lora-rank", "2", "--train-tokens", "[x],("], "has an invalid regex '('"),
        (["--train-tokens", "[x]"], "'train_tokens' trains ReToken rows beside a Stable Cascade LoRA"),
        (["--lora-rank", "2", "--train-tokens", "<|endoftext|>"], "already a token of the tokenizer"),
        (["--lora-rank", "2", "--train-tokens", "^zzzzqqq</w>"], "matches no token"),
    ]
    path = config(tmp_path, runs["init"], tmp_path / "data", name="bad.json")
    commands = [["train", "--stage", "c", "--config", path, *argv] for argv, _ in cases]
    bad = config(tmp_path, runs["init"], tmp_path / "data", name="bad2.json", lora_rank=2, train_tokens=[["[x]", 3]])
    commands.append(["train", "--stage", "c", "--config", bad])
    cases.append(([], "bad2.json: key 'train_tokens' must be a non-empty list of [token, aggregation regex or null]"))
    lora = str(runs[None][0] / "lora.safetensors")
    for argv, message in [  # generate: checked before any weights are read too
        (["--lora", str(tmp_path / "none.safetensors")], "is neither a .safetensors file nor a folder"),
        (["--lora", f"{lora}:inf"], "the scale must be a finite number"),
        (["--train-tokens", "[x]", "--lora", lora], "'[x]' belongs to a LoRA file: give --lora PATH before it"),
        (["--lora", lora, "--train-tokens", "[x],("], "--train-tokens has an invalid regex '('"),
    ]:
        cases.append((argv, message))
        commands.append(["generate", "a prompt", "--model", str(runs["init"]), *argv])
    for command, (_, message) in zip(commands, cases, strict=True):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
