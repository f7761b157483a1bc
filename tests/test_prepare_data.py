"""`wurst-jax prepare-data`: captioned image folders → fine-tune shards whose embeddings are the EfficientNet
reference's, usable by `wurst-jax train`; bad input names the file and leaves nothing behind."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import nchw, nhwc, rel_err, torch_effnet
from PIL import Image
from test_finetune import config, metrics

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.images import load_image
from wurst_jax.train.prepare import effnet_size
from wurst_jax.train.shards import Shards, shard_spec
from wurst_jax.weights import read_config

EFFNET = wj.EfficientNetConfig(c_latent=16, c_cond=48, effnet="tiny")  # 16 channels, as the prior's c_in
CAPTIONS = {"b/cat.png": "a cat", "a.jpg": "a red square", "c.png": "", "d.webp": "two dots", "e.png": "a grey moon"}


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    ref = torch_effnet(EFFNET, seed=3)
    folder = tmp_path_factory.mktemp("effnet") / "effnet"
    ref.save_pretrained(folder)
    return ref, folder


def image_folder(root, with_txt=True):
    """Five images of different sizes, modes and formats (a subfolder too), captions in .txt files beside them."""
    rng = np.random.default_rng(0)
    shapes = {
        "b/cat.png": (90, 60, "RGB"),
        "a.jpg": (64, 64, "RGB"),
        "c.png": (70, 150, "RGBA"),
        "d.webp": (140, 80, "L"),
    }
    shapes["e.png"] = (40, 40, "P")  # smaller than the crop: upscaled
    for name, (h, w, mode) in shapes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(path)
        if with_txt:
            path.with_suffix(".txt").write_text(CAPTIONS[name] + "\n")
    return root


def reference_embeddings(ref, crops, resolution):
    """torch: bilinear antialiased resize to the encoder's side, ImageNet normalisation, the encoder."""
    side = effnet_size(resolution)
    x = torch.nn.functional.interpolate(nchw(crops / 255.0), size=(side, side), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        return nhwc(ref((x - mean[:, None, None]) / std[:, None, None]))


def test_shards_hold_reference_embeddings_and_fine_tune_the_prior(effnet, tiny_checkpoints, tmp_path, capsys):
    ref, effnet_dir = effnet
    src, out = image_folder(tmp_path / "src"), tmp_path / "data"
    args = ["prepare-data", str(src), str(out), "--effnet", str(effnet_dir), "--resolution", "128", "--images"]
    assert main([*args, "--shard-size", "2", "--batch-size", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    names = sorted(CAPTIONS)  # sorted by path
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-00000.npz",
        "shard-00001.npz",
        "shard-00002.npz",
        "wurst_jax_data.json",
    ]
    z = [np.load(out / f"shard-0000{i}.npz") for i in range(3)]
    captions = np.concatenate([s["captions"] for s in z])
    crops = np.concatenate([s["images"] for s in z])
    embeddings = np.concatenate([s["image_embeddings"] for s in z])
    assert list(captions) == [CAPTIONS[n] for n in names] and captions.dtype.kind == "U"
    assert crops.shape == (5, 128, 128, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops, np.stack([load_image(src / n, 128) for n in names]))
    assert embeddings.shape == (5, 3, 3, 16) and embeddings.dtype == np.float32  # 128 px → 96 px → 3 × 3
    assert rel_err(embeddings, reference_embeddings(ref, crops.astype(np.float32), 128)) < 1e-5
    manifest = json.loads((out / "wurst_jax_data.json").read_text())
    assert manifest["samples"] == 5 and manifest["image_embeddings"] == [3, 3, 16] and manifest["images"]

    # the shards are what stages c and b read (checked as fine-tuning checks them)
    decoder_dir, prior_dir, _ = tiny_checkpoints
    configs = {p.name: read_config(p)[1] for p in (decoder_dir / "decoder", decoder_dir / "vqgan", prior_dir / "prior")}
    assert Shards(out, shard_spec("b", configs)).sizes == [2, 2, 1]
    cfg = config(tmp_path, prior_dir, out, c={"steps": 3}, batch_size=2)
    assert main(["train", "--stage", "c", "--config", cfg]) == 0
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2, 3]


def test_metadata_jsonl_and_bfloat16(effnet, tmp_path):
    _, effnet_dir = effnet
    src = image_folder(tmp_path / "src", with_txt=False)
    rows = [{"file_name": n, "caption": f"{c}!", "other": 1} for n, c in CAPTIONS.items()]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "data"
    args = ["prepare-data", str(src), str(out), "--effnet", str(effnet_dir), "--resolution", "64", "--quiet"]
    assert main([*args, "--caption-column", "caption"]) == 0
    z = np.load(out / "shard-00000.npz")
    assert list(z["captions"]) == [f"{c}!" for c in CAPTIONS.values()]  # metadata order
    assert set(z.files) == {"captions", "image_embeddings"}  # no --images: no crops
    f32 = z["image_embeddings"]
    assert main([*args, "--caption-column", "caption", "--dtype", "bfloat16", "--overwrite"]) == 0
    bf16 = np.load(out / "shard-00000.npz")["image_embeddings"]
    assert bf16.dtype == np.float32 and rel_err(bf16, f32) < 0.02


def bad_input_cases(tmp_path, effnet_dir, tiny_prior):
    """(name, SRC, extra args, the message) for each kind of bad input."""
    missing_txt = image_folder(tmp_path / "missing_txt")
    (missing_txt / "a.txt").unlink()
    broken = image_folder(tmp_path / "broken")
    (broken / "c.png").write_bytes(b"not a png")
    bad_json = image_folder(tmp_path / "bad_json", with_txt=False)
    (bad_json / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "x"}\n{"file_name": \n')
    no_column = image_folder(tmp_path / "no_column", with_txt=False)
    (no_column / "metadata.jsonl").write_text('{"file_name": "a.jpg", "caption": "x"}\n')
    gone = image_folder(tmp_path / "gone", with_txt=False)
    (gone / "metadata.jsonl").write_text('{"file_name": "zzz.png", "text": "x"}\n')
    ok = image_folder(tmp_path / "ok")
    (tmp_path / "outside.png").write_bytes((ok / "a.jpg").read_bytes())
    escape = image_folder(tmp_path / "escape", with_txt=False)
    (escape / "metadata.jsonl").write_text('{"file_name": "../outside.png", "text": "x"}\n')
    absolute = image_folder(tmp_path / "absolute", with_txt=False)
    (absolute / "metadata.jsonl").write_text(json.dumps({"file_name": str(tmp_path / "outside.png"), "text": "x"}))
    bad_utf8 = image_folder(tmp_path / "bad_utf8", with_txt=False)
    (bad_utf8 / "metadata.jsonl").write_bytes(b'{"file_name": "a.jpg", "text": "x"}\n{"file_name": "\xff"}\n')
    bad_caption = image_folder(tmp_path / "bad_caption")
    (bad_caption / "d.txt").write_bytes(b"a red\n\xc3\x28 circle")
    bomb = image_folder(tmp_path / "bomb")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # a 30000² RGB image, with almost no pixels
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    (bomb / "c.png").write_bytes(png)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return [
        ("symlink loop", loop, [], "loop: a symlink loop"),
        ("outside SRC", escape, [], "line 1: file_name '../outside.png' points outside"),
        ("absolute path", absolute, [], "points outside"),
        ("metadata utf-8", bad_utf8, [], "metadata.jsonl, line 2: not valid UTF-8"),
        ("caption utf-8", bad_caption, [], "d.txt, line 2: not valid UTF-8"),
        ("bomb", bomb, [], "c.png: image too large to read safely"),
        ("huge resolution", ok, ["--resolution", "100000"], "--resolution 100000: expected an integer from 32 to 8192"),
        ("empty", tmp_path / "nothing_here", [], "not a folder"),
        ("no caption", missing_txt, [], "1 of 5 images have no caption file beside them (a.jpg)"),
        ("not an image", broken, [], "c.png: not a readable image"),
        ("bad metadata line", bad_json, [], "metadata.jsonl, line 2: not valid JSON"),
        ("caption column", no_column, [], "line 1: no caption string under 'text' (has ['caption', 'file_name']"),
        ("missing file", gone, [], "line 1: 'zzz.png' does not exist"),
        ("not an effnet", ok, ["--effnet", str(tiny_prior)], "a prior folder, not the EfficientNet encoder"),
        ("resolution", ok, ["--resolution", "16"], "--resolution 16: expected an integer from 32"),
    ]


def test_bad_input_names_the_problem_and_writes_nothing(effnet, tiny_checkpoints, tmp_path, capsys):
    _, effnet_dir = effnet
    cases = bad_input_cases(tmp_path, effnet_dir, tiny_checkpoints[1] / "prior")
    for name, src, extra, message in cases:
        out = tmp_path / f"out-{name}"
        capsys.readouterr()
        args = ["prepare-data", str(src), str(out), "--effnet", str(effnet_dir), "--resolution", "64", *extra]
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("wurst-jax prepare-data: error: ") and message in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name], name

    # an existing OUT is kept unless --overwrite
    out = tmp_path / "kept"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["prepare-data", str(cases[-1][1]), str(out), "--effnet", str(effnet_dir), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"
