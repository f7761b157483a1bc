"""Broken and hostile weight files: each ends in one `WeightsError` naming the file, and the CLI exits 2 with one
error line and writes nothing.

Every file is built here from raw bytes (safetensors headers, index.json) or with `torch.save` (.pt), so each case
states exactly what is wrong with it.
"""

import dataclasses
import json
import os
import random
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import wurst_jax as wj
from wurst_jax.weights.converted import convert_checkpoint
from wurst_jax.weights.safetensors_io import SafetensorsFile, weight_files
from wurst_jax.weights.torch_pickle import read_torch_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = f"{WEIGHTS}.index.json"


# ---------------------------------------------------------------------------------------------------------------
# building the files


def st(header, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (a JSON-able object or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


GOOD = st({"w": entry()}, np.arange(2, dtype=np.float32).tobytes())


def single(data: bytes):
    """A single .safetensors SRC holding `data`."""

    def build(tmp: Path) -> tuple[Path, Path]:
        path = tmp / "x.safetensors"
        path.write_bytes(data)
        return path, path

    return build


def prior_folder(tmp: Path) -> Path:
    folder = tmp / "prior"
    folder.mkdir()
    config = {"_class_name": "WuerstchenPrior", **dataclasses.asdict(wj.StageCConfig.tiny())}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def sharded(index, make=None):
    """A prior component folder whose weights are `index` (a JSON-able object or raw bytes); `make(tmp, folder)`
    adds files. The error must name the index."""

    def build(tmp: Path) -> tuple[Path, Path]:
        folder = prior_folder(tmp)
        (tmp / "outside.safetensors").write_bytes(GOOD)
        if make:
            make(tmp, folder)
        raw = index(tmp) if callable(index) else index
        (folder / INDEX).write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        return folder, folder / INDEX

    return build


def weight_map(*names) -> dict:
    return {"metadata": {}, "weight_map": {f"w{i}": n for i, n in enumerate(names)}}


def link(name: str, target: str):
    return lambda tmp, folder: os.symlink(target, folder / name)


def pt(make):
    """A .pt SRC made by torch.save(make())."""

    def build(tmp: Path) -> tuple[Path, Path]:
        path = tmp / "x.pt"
        torch.save(make(), path)
        return path, path

    return build


def patched_pt(old: bytes, new: bytes):
    """A .pt SRC whose pickle has `old` replaced by `new`: what a damaged or crafted file gives torch's reader."""

    def build(tmp: Path) -> tuple[Path, Path]:
        good, path = tmp / "good.pt", tmp / "x.pt"
        torch.save({"w": torch.zeros(2)}, good)
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                if info.filename.endswith("data.pkl"):
                    assert old in data
                    data = data.replace(old, new)
                zout.writestr(info, data)
        return path, path

    return build


NESTED = b"[" * 100_000 + b"]" * 100_000
F32x2 = bytes(8)

# id → (build(tmp) -> (SRC, the file the message must name), what the message must say)
CASES = {
    # safetensors headers the project's parser let through or crashed on
    "overlapping-tensors": (
        single(st({"a": entry(), "b": entry()}, F32x2)),
        r"rejected by the safetensors parser: invalid offset for tensor `[ab]`; .*no overlaps",
    ),
    "overlapping-bf16": (
        single(st({"a": entry("BF16", (2,), (0, 4)), "b": entry("BF16", (2,), (0, 4))}, bytes(4))),
        r"rejected by the safetensors parser: invalid offset",
    ),
    "gap-between-tensors": (
        single(st({"a": entry("F32", (1,), (4, 8))}, F32x2)),
        r"rejected by the safetensors parser: invalid offset",
    ),
    "bytes-after-the-tensors": (
        single(st({"a": entry()}, bytes(16))),
        r"rejected by the safetensors parser: .*not fully covered",
    ),
    "deeply-nested-json": (single(st(b'{"a": ' + NESTED + b"}")), r"corrupt safetensors header \(JSON nested too"),
    "infinity-offset": (
        single(st(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}', F32x2)),
        r"corrupt safetensors header \(Infinity is not valid JSON\)",
    ),
    "nan-in-shape": (
        single(st(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', F32x2)),
        r"NaN is not valid JSON",
    ),
    "shape-2**64": (
        single(st({"a": entry("F32", (2**64,))}, F32x2)),
        r"tensor 'a' spans 8 B but shape \(18446744073709551616,\) needs 73786976294838206464",
    ),
    "shape-1e300": (
        single(st({"a": entry("F32", (1e300,))}, F32x2)),
        r"tensor 'a' has an unsupported or malformed entry \(shape must be a list of non-negative integers\)",
    ),
    "negative-dimensions": (
        single(st({"a": entry("F32", (-1, -2))}, F32x2)),
        r"shape must be a list of non-negative integers",
    ),
    "bool-dimension": (single(st({"a": entry("F32", (True, 2))}, F32x2)), r"shape must be a list of non-negative"),
    "huge-empty-shape": (
        single(st({"a": entry("F32", (2**40, 2**40, 0), (0, 0))})),
        r"rejected by the safetensors parser: overflow computing buffer size",
    ),
    "65-dimensions": (
        single(st({"a": entry("F32", (1,) * 65, (0, 4))}, bytes(4))),
        r"65 dimensions, at most 64 are supported",
    ),
    "float-offsets": (single(st({"a": entry("F32", (2,), (0.0, 8.0))}, F32x2)), r"data_offsets must be two integers"),
    "begin-after-end": (
        single(st({"a": entry("F32", (0,), (8, 0))}, F32x2)),
        r"data_offsets must satisfy 0 <= begin <= end",
    ),
    "5000-digit-integer": (
        single(st(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, ' + b"9" * 5000 + b"]}}", F32x2)),
        r"corrupt safetensors header \(Exceeds the limit \(4300 digits\)",
    ),
    "duplicate-tensor-name": (
        single(st(b'{"a": ' + json.dumps(entry()).encode() + b', "a": ' + json.dumps(entry()).encode() + b"}", F32x2)),
        r"corrupt safetensors header \(the key 'a' appears twice\)",
    ),
    "header-not-utf8": (
        single(st(b'{"a\xff": ' + json.dumps(entry()).encode() + b"}", F32x2)),
        r"corrupt safetensors header \(not UTF-8: byte 3 is invalid\)",
    ),
    "entry-not-an-object": (
        single(st({"a": 5})),
        r"tensor 'a' has an unsupported or malformed entry \(expected an obj",
    ),
    "complex-dtype": (
        single(st({"a": entry("C64", (2,), (0, 16))}, bytes(16))),
        r"tensor 'a' has an unsupported or malformed entry \(dtype 'C64' is not one of F64, F32",
    ),
    "float8-dtype": (single(st({"a": entry("F8_E4M3", (2,), (0, 2))}, bytes(2))), r"dtype 'F8_E4M3' is not one of"),
    "metadata-not-strings": (
        single(st({"__metadata__": {"format": 1}, "a": entry()}, F32x2)),
        r"__metadata__ must map names to strings",
    ),
    "single-weights-file-is-a-symlink-loop": (
        lambda tmp: (f := prior_folder(tmp), os.symlink(WEIGHTS, f / WEIGHTS))[0:1] + (f / WEIGHTS,),
        r"cannot open it \(a symlink loop\)",
    ),
    # sharded indexes: shards outside the folder, malformed weight maps
    "index-names-../outside": (sharded(weight_map("../outside.safetensors")), r"is outside .*prior; an index must"),
    "index-names-an-absolute-path": (
        sharded(lambda tmp: weight_map(str(tmp / "outside.safetensors"))),
        r"shard '/.*outside\.safetensors' is outside",
    ),
    "shard-symlink-points-out": (
        sharded(weight_map("s.safetensors"), link("s.safetensors", "../outside.safetensors")),
        r"shard 's\.safetensors' links to .*outside\.safetensors, outside .*prior; shards must lie inside",
    ),
    "shard-is-a-symlink-loop": (
        sharded(weight_map("s.safetensors"), link("s.safetensors", "s.safetensors")),
        r"shard 's\.safetensors' cannot be opened \(a symlink loop\)",
    ),
    "shard-is-a-folder": (
        sharded(weight_map("sub"), lambda tmp, folder: (folder / "sub").mkdir()),
        r"shard 'sub' is not a file",
    ),
    "weight-map-is-a-list": (
        sharded({"weight_map": ["s.safetensors"]}),
        r'not a valid safetensors index \(expected an object whose "weight_map" maps tensor names to shard file names',
    ),
    "weight-map-holds-numbers": (
        sharded({"weight_map": {"w": 3}}),
        r"not a valid safetensors index \(weight_map\['w'\] is 3, expected a shard file name\)",
    ),
    "index-is-a-list": (sharded([1, 2]), r"not a valid safetensors index \(expected an object"),
    "index-not-utf8": (sharded(b'{"weight_map": {"w": "\xff"}}'), r"not a valid safetensors index \(not UTF-8"),
    "index-deeply-nested": (
        sharded(b'{"weight_map": ' + NESTED + b"}"),
        r"not a valid safetensors index \(JSON nested too deeply\)",
    ),
    # .pt state dicts
    "pt-int-keys": (
        pt(lambda: {"state_dict": {1: torch.zeros(2), "a": torch.zeros(2)}}),
        r"state dict keys must be tensor names \(strings\); 1 are not: 1",
    ),
    "pt-tuple-keys": (pt(lambda: {("a", "b"): torch.zeros(2)}), r"tensor names \(strings\); 1 are not: \('a', 'b'\)"),
    "pt-complex": (
        pt(lambda: {"w": torch.zeros(2, dtype=torch.complex64)}),
        r"1 tensor\(s\) cannot be converted: 'w' \(complex64\); expected dense CPU tensors of dtype float64",
    ),
    "pt-float8": (pt(lambda: {"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}), r"'w' \(float8_e4m3fn\)"),
    "pt-sparse": (
        pt(lambda: {"w": torch.eye(2).to_sparse(), "v": torch.eye(2).to_sparse_csr()}),
        r"'w' \(sparse_coo\), 'v'",
    ),
    "pt-quantized": (
        pt(lambda: {"w": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)}),
        r"'w' \(qint8\)",
    ),
    "pt-meta-tensor": (pt(lambda: {"w": torch.zeros(2, device="meta")}), r"'w' \(on meta, no data\)"),
    "pt-65-dimensions": (pt(lambda: {"w": torch.zeros((1,) * 65)}), r"'w' \(65 dimensions\)"),
    "pt-crafted-offset": (
        patched_pt(b"K\x00K\x02\x85", b"X\x01\x00\x00\x00aK\x02\x85"),
        r"not a readable PyTorch checkpoint \(TypeError: set_\(\) received an invalid combination",
    ),
    "pt-size-beyond-storage": (
        patched_pt(b"K\x02\x85q", b"K\xc8\x85q"),
        r"not a readable PyTorch checkpoint \(RuntimeError: ",
    ),
}
# one per reader (each run imports jax, flax and, for .pt, torch: seconds each)
CLI_CASES = ["overlapping-tensors", "index-names-../outside", "pt-complex", "pt-sparse"]  # pt-sparse: torch warns


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# the Python API and the CLI


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load, rebuilding the quantized tensor
@pytest.mark.parametrize("case", list(CASES))
def test_python_api_raises_one_error_naming_the_file(tmp_path, case):
    build, problem = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about sparse / quantized tensors it is asked to save
        src, named = build(tmp_path)
    stage = None if src.is_dir() else "prior"
    with pytest.raises(wj.WeightsError) as e:
        convert_checkpoint(src, tmp_path / "out", stage=stage)
    msg = str(e.value)
    assert msg.startswith(f"{named}: ") and re.search(problem, msg), msg
    assert "\n" not in msg and len(msg) < 600
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    src, named = CASES[case][0](tmp_path)
    stage = [] if src.is_dir() else ["--stage", "prior"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    env["JAX_PLATFORMS"] = "cpu"
    dst = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "wurst_jax.cli", "convert", str(src), str(dst), *stage],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith(f"wurst-jax convert: error: {named}: "), res.stderr
    assert "Traceback" not in res.stderr and not res.stdout
    assert not dst.exists() and not leftovers(tmp_path)


def test_load_component_refuses_a_shard_outside_its_folder(tmp_path):
    folder, index = sharded(weight_map("../outside.safetensors"))(tmp_path)
    with pytest.raises(wj.WeightsError, match=re.escape(f"{index}: shard '../outside.safetensors' is outside")):
        wj.load_component(folder)


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt", "folder"])
def test_symlink_loop_as_source(tmp_path, name):
    loop = tmp_path / name
    os.symlink(name, loop)
    read = {
        "x.safetensors": SafetensorsFile,
        "x.pt": read_torch_checkpoint,
        "folder": wj.load_component,
    }[name]
    problem = r"not a directory" if name == "folder" else r"cannot open it \(a symlink loop\)"
    with pytest.raises(wj.WeightsError, match=re.escape(str(loop)) + ": " + problem):
        read(loop)


# ---------------------------------------------------------------------------------------------------------------
# what must still work


def test_bf16_scalar_and_empty_tensors_read_exactly(tmp_path):
    """The safetensors parser accepts bf16 at open (only its numpy get_tensor cannot); our reader returns it, and a
    0-d tensor's one value (it once read as 0)."""
    values = np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16)
    ints, scalar = np.arange(4, dtype=np.int16), np.array(-7.5, np.float32)
    path = tmp_path / "x.safetensors"
    header = {
        "b": entry("BF16", (3,), (0, 6)),
        "i": entry("I16", (2, 2), (6, 14)),
        "s": entry("F32", (), (14, 18)),
        "e": entry("F16", (0, 3), (18, 18)),
    }
    path.write_bytes(st(header, values.tobytes() + ints.tobytes() + scalar.tobytes()))
    f = SafetensorsFile(path)
    assert f.dtype("b") == np.dtype(ml_dtypes.bfloat16) and f.shape("i") == (2, 2) and f.shape("s") == ()
    np.testing.assert_array_equal(f.get("b"), values)
    np.testing.assert_array_equal(f.get("i"), ints.reshape(2, 2))
    assert f.get("s").shape == () and f.get("s") == -7.5
    assert f.get("e").shape == (0, 3) and f.get("e").dtype == np.float16


def test_shards_in_subfolders_and_hugging_face_cache_links_are_allowed(tmp_path):
    """A Hugging Face cache snapshot links every file into the repository's blobs/; shards may sit in subfolders."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_bytes(GOOD)
    folder = repo / "snapshots" / "rev" / "prior"
    (folder / "sub").mkdir(parents=True)
    os.symlink("../../../blobs/0123abcd", folder / "a.safetensors")
    (folder / "sub" / "b.safetensors").write_bytes(GOOD)
    (folder / INDEX).write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "sub/b.safetensors"}}))
    files = weight_files(folder, WEIGHTS.removesuffix(".safetensors"))
    assert files == [folder / "a.safetensors", folder / "sub" / "b.safetensors"]
    np.testing.assert_array_equal(SafetensorsFile(files[0]).get("w"), np.arange(2, dtype=np.float32))


def test_mutated_headers_raise_weights_error_or_read_correctly(tmp_path):
    """Every byte of a valid header replaced by a few others: the reader refuses cleanly or reads what it says."""
    head = json.dumps({"__metadata__": {"k": "v"}, "a": entry("F32", (2, 1)), "b": entry("BF16", (2,), (8, 12))})
    data = st(head.encode(), np.ones(2, np.float32).tobytes() + np.ones(2, ml_dtypes.bfloat16).tobytes())
    path, outcomes = tmp_path / "m.safetensors", {"ok": 0, "refused": 0}
    for i in range(len(data)):
        for b in (b"0", b"9", b'"', b"\xff"):
            path.write_bytes(data[:i] + b + data[i + 1 :])
            try:
                f = SafetensorsFile(path)
            except wj.WeightsError as e:
                assert str(e).startswith(f"{path}: ") or str(path) in str(e)
                outcomes["refused"] += 1
                continue
            for k in f.keys():
                assert f.get(k).shape == f.shape(k)
            outcomes["ok"] += 1
    assert outcomes["refused"] > 100 and outcomes["ok"] > 10, outcomes


def test_mutated_pt_files_raise_weights_error_or_read_correctly(tmp_path):
    """Random bytes of a small .pt changed: torch's reader raises many kinds of error; each becomes a WeightsError."""
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"a.weight": torch.ones(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}}, good)
    data, path, rng = good.read_bytes(), tmp_path / "m.pt", random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(150):
        mutated = bytearray(data)
        for _ in range(rng.choice([1, 2, 4])):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        path.write_bytes(mutated)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source, _ = read_torch_checkpoint(path)
        except wj.WeightsError as e:
            assert str(e).startswith(f"{path}: ")
            outcomes["refused"] += 1
            continue
        for ref in source.values():
            assert ref.read().shape == ref.shape
        outcomes["ok"] += 1
    assert outcomes["refused"] > 30 and outcomes["ok"] > 10, outcomes
