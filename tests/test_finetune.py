"""`wurst-jax train` with an `init` checkpoint: fine-tune tiny diffusers pipelines on `.npz` shards, resume,
and load the result with our pipelines and diffusers' own; bad shards and configs fail naming the problem."""

import dataclasses
import filecmp
import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.train.shards import Shards, ShardSpec

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a white star", "a black moon"]


def write_shard(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def prior_shard(path, n=4, size=4, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, size, size, 16)).astype(np.float32)
    return write_shard(path, captions=np.array(CAPTIONS[:n]), image_embeddings=x * 42.0 - 1.0)


def config(tmp_path, init, data, name="run.json", **settings):
    run = {"out": str(tmp_path / "out"), "init": str(init), "data": str(data)}
    run.update({"warmup_steps": 1, "log_every": 1, "ckpt_every": 1, "batch_size": 4, "seed": 0, **settings})
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return str(path)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def diffusers_classes(monkeypatch):
    """diffusers saves these deprecated classes as ("diffusers", name) in model_index.json but no longer exports
    them at top level, so its `from_pretrained` cannot load its own Würstchen folders without this."""
    import diffusers
    from diffusers.pipelines.deprecated import wuerstchen

    for name in ("WuerstchenPrior", "WuerstchenDiffNeXt", "PaellaVQModel"):
        monkeypatch.setattr(diffusers, name, getattr(wuerstchen, name), raising=False)
    return wuerstchen


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k].float().numpy(), sb[k].float().numpy()) for k in sa)


def test_prior_finetune_trains_resumes_sharded_and_exports(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    from diffusers import WuerstchenPriorPipeline

    _, prior_dir, _ = tiny_checkpoints
    prior_shard(tmp_path / "data" / "shard-000.npz")  # 4 samples, repeated: 8 epochs per batch of 32
    settings = dict(lr=3e-3, batch_size=32, ema_decay=0.5, cond_dropout=0.0, ckpt_every=5)
    cfg = config(tmp_path, prior_dir, tmp_path / "data", c={"steps": 10}, **settings)
    assert main(["train", "--stage", "c", "--config", cfg]) == 0
    out = tmp_path / "out"
    assert (out / "ckpt_c" / "10").is_dir() and (out / "prior").is_dir()

    # "interrupted" at step 10: a longer run resumes there — here on 8 devices with FSDP, the prior's blocks
    # scanned and rematerialised (the same parameter tree, so the same checkpoint)
    capsys.readouterr()
    scan = dict(sharding="fsdp", scan_blocks=True, remat=True)
    cfg = config(tmp_path, prior_dir, tmp_path / "data", c={"steps": 20}, **scan, **settings)
    assert main(["train", "--stage", "c", "--config", cfg]) == 0
    assert "stage c: resumed at step 10" in capsys.readouterr().out
    losses = [m["loss"] for m in metrics(out)]
    assert [m["step"] for m in metrics(out)] == list(range(1, 21)) and np.all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:4]), losses

    for name in ("model_index.json", "scheduler", "tokenizer", "text_encoder"):
        assert (out / name).exists()
    assert not (out / ".pipeline.tmp").exists()
    names = sorted(p.name for p in (prior_dir / "text_encoder").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(prior_dir / "text_encoder", out / "text_encoder", names, shallow=False)
    assert match == names and not mismatch and not errors  # the frozen text encoder is copied byte for byte

    model, info = diffusers_classes(monkeypatch).WuerstchenPrior.from_pretrained(
        out / "prior", output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mis-shaped
    assert same_weights(WuerstchenPriorPipeline.from_pretrained(out).prior, model)
    ours = wj.WuerstchenPriorPipeline.from_pretrained(out, progress=False)
    before = jax.tree_util.tree_leaves(wj.load_component(prior_dir / "prior")[1])
    after = jax.tree_util.tree_leaves(ours.prior.variables)
    assert np.mean([not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]) > 0.9


@pytest.fixture
def small_decoder_pipeline(tiny_checkpoints, tmp_path):
    """The tiny decoder pipeline with a two-level decoder (faster to compile): 16×16 images work."""
    import shutil

    from conftest import torch_decoder

    root = tmp_path / "init"
    shutil.copytree(tiny_checkpoints[0], root)
    shutil.rmtree(root / "decoder")
    cfg = dataclasses.replace(
        wj.StageBConfig.tiny(),
        c_hidden=(8, 16),
        nhead=(-1, 2),
        blocks=(1, 1),
        level_config=("CT", "CTA"),
        inject_effnet=(False, True),
    )
    torch_decoder(cfg, seed=4).save_pretrained(root / "decoder")
    return root


def test_decoder_and_vqgan_finetunes_write_loadable_pipelines(small_decoder_pipeline, tmp_path, monkeypatch):
    from diffusers import WuerstchenDecoderPipeline

    decoder_dir = small_decoder_pipeline
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    emb = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
    write_shard(tmp_path / "data" / "a.npz", captions=np.array(CAPTIONS[:2]), images=images, image_embeddings=emb)
    stage_b = {"steps": 2, "scan_blocks": True, "remat": True}  # a stage section may set the block options
    cfg = config(tmp_path, decoder_dir, tmp_path / "data", batch_size=2, b=stage_b, save_dtype="bfloat16")
    assert main(["train", "--stage", "b", "--config", cfg]) == 0
    out = tmp_path / "out"
    assert [m["step"] for m in metrics(out)] == [1, 2]
    model, info = diffusers_classes(monkeypatch).WuerstchenDiffNeXt.from_pretrained(
        out / "decoder", output_loading_info=True
    )
    assert not any(info.values()), info
    assert same_weights(WuerstchenDecoderPipeline.from_pretrained(out).decoder, model)
    pipe = wj.WuerstchenDecoderPipeline.from_pretrained(out, progress=False)
    assert pipe.decoder.module.config.c_hidden == (8, 16)
    with open(out / "decoder" / "diffusion_pytorch_model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}  # save_dtype
    for part in ("vqgan", "text_encoder"):
        names = sorted(p.name for p in (decoder_dir / part).iterdir())
        assert filecmp.cmpfiles(decoder_dir / part, out / part, names, shallow=False)[0] == names

    # stage a on the same shards: the VQGAN (BatchNorm statistics included) comes back loadable
    cfg = config(tmp_path / "a", decoder_dir, tmp_path / "data", batch_size=2, a={"steps": 1})
    assert main(["train", "--stage", "a", "--config", cfg]) == 0
    vq, info = diffusers_classes(monkeypatch).PaellaVQModel.from_pretrained(
        tmp_path / "a" / "out" / "vqgan", output_loading_info=True
    )
    assert not any(info.values()), info


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    for i, n in enumerate((3, 5)):
        prior_shard(tmp_path / f"{i}.npz", n=n, seed=i)
    spec = ShardSpec({"captions": (1, None, "U"), "image_embeddings": (4, 16, "f")})
    a, b = Shards(tmp_path, spec), Shards(tmp_path, spec, cache=1)
    for k in (5, 0, 3):  # any order, any cache: the same batch k
        np.testing.assert_array_equal(a.batch(k, 4, seed=7)["image_embeddings"], b.batch(k, 4, 7)["image_embeddings"])
    epoch = sorted(a.rows(0, 8, seed=7))  # one epoch: every sample exactly once
    assert epoch == sorted([(0, r) for r in range(3)] + [(1, r) for r in range(5)])
    assert a.rows(0, 8, 7) != a.rows(1, 8, 7) and a.rows(0, 8, 7) != a.rows(0, 8, 8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"captions": np.array(["x", "y"])}, "missing ['image_embeddings']"),
        ({"captions": np.array(["x", "y"]), "image_embeddings": np.zeros((2, 4, 4, 8), np.float32)}, "16 channels"),
        ({"captions": np.array(["x", "y"]), "image_embeddings": np.zeros((2, 4, 16), np.float32)}, "expected 4 dims"),
        ({"captions": np.array(["x", "y"]), "image_embeddings": np.full((2, 4, 4, 16), np.nan)}, "non-finite"),
        ({"captions": np.array(["x"]), "image_embeddings": np.zeros((2, 4, 4, 16), np.float32)}, "same N"),
        ({"captions": np.array([1, 2]), "image_embeddings": np.zeros((2, 4, 4, 16), np.float32)}, "strings"),
    ],
)
def test_bad_shards_name_the_file(tiny_checkpoints, tmp_path, capsys, arrays, message):
    _, prior_dir, _ = tiny_checkpoints
    prior_shard(tmp_path / "data" / "good.npz")
    write_shard(tmp_path / "data" / "zbad.npz", **arrays)
    cfg = config(tmp_path, prior_dir, tmp_path / "data", c={"steps": 1})
    assert main(["train", "--stage", "c", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "zbad.npz" in err and message in err, err


def test_bad_images_and_configs(tiny_checkpoints, tmp_path, capsys):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    emb = np.zeros((1, 4, 4, 16), np.float32)
    write_shard(
        tmp_path / "d" / "f.npz", captions=np.array(["x"]), images=np.zeros((1, 64, 64, 3)), image_embeddings=emb
    )
    cfg = config(tmp_path, decoder_dir, tmp_path / "d", steps=1)
    assert main(["train", "--stage", "b", "--config", cfg]) == 2
    assert "f.npz: images has dtype float64, expected uint8" in capsys.readouterr().err
    write_shard(tmp_path / "d" / "f.npz", captions=np.array(["x"]), images=np.zeros((1, 42, 42, 3), np.uint8))
    assert main(["train", "--stage", "a", "--config", cfg]) == 2
    assert "f.npz: images are 42×42; H and W must be multiples of 4" in capsys.readouterr().err

    cases = [
        (dict(size=64), "unknown keys ['size']"),
        (dict(c={"stepz": 1}), "section 'c': unknown keys ['stepz']"),
        (dict(data_workers=4), "unknown keys ['data_workers']"),
        (dict(sharding="tp"), "'sharding' must be 'dp' or 'fsdp'"),
        (dict(remat="yes"), "'remat' must be true or false, got 'yes'"),
    ]
    for extra, message in cases:
        cfg = config(tmp_path, prior_dir, tmp_path / "data", **extra)
        assert main(["train", "--stage", "c", "--config", cfg]) == 2
        assert message in capsys.readouterr().err
    cfg = config(tmp_path, decoder_dir, tmp_path / "d", scan_blocks=True)
    assert main(["train", "--stage", "a", "--config", cfg]) == 2
    assert (
        "'scan_blocks' is an option of the prior and the decoder (stages c, b), not stage a" in capsys.readouterr().err
    )
    cfg = config(tmp_path, prior_dir, tmp_path / "empty")
    assert main(["train", "--stage", "c", "--config", cfg]) == 2
    assert "no .npz shards" in capsys.readouterr().err
    assert main(["train", "--stage", "a-decoder", "--config", cfg]) == 2
    assert "trains stage a, b or c" in capsys.readouterr().err
