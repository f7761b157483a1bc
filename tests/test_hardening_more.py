"""Hardening, the rest of issue 20: configs beyond the sanity bounds (every kind, config.json, `convert --config`,
the tiny model's train config), complex tensors, symlink loops as convert's SRC / DST and prepare-data's OUT. Each
is one error line naming the file and the culprit, exit 2 from the CLI, no traceback, nothing on disk.

Everything runs in this process (`wurst_jax.cli.main`) and fails before any weights are read or any model is
built: milliseconds per case. The real-signal cases are in tests/test_interrupt_points.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.models import bounds
from wurst_jax.models.cascade import ControlNetConfig, StableCascadeUNetConfig
from wurst_jax.models.clip_vision import CLIPVisionConfig
from wurst_jax.serving.backend import TINY_MODEL
from wurst_jax.tiny.recipe import tiny_config
from wurst_jax.weights import read_config
from wurst_jax.weights.converted import convert_checkpoint

WHY = r", the largest released model's\)"

# id → (config.json class keys, the tiny config, overrides, what the error says after "config.json: ")
BOUND_CASES = {
    "prior-depth-10**4": (
        {"_class_name": "WuerstchenPrior"},
        wj.StageCConfig.tiny(),
        {"depth": 10**4},
        r"key 'depth' is 10000, beyond the sanity bound 256 \(8 × 32" + WHY,
    ),
    "prior-depth-10**6": ({"_class_name": "WuerstchenPrior"}, wj.StageCConfig.tiny(), {"depth": 10**6}, r"'depth' is"),
    "prior-width-10**9": (
        {"_class_name": "WuerstchenPrior"},
        wj.StageCConfig.tiny(),
        {"c": 10**9},
        r"key 'c' is 1000000000, beyond the sanity bound 12288 \(8 × 1536",
    ),
    "prior-depth-nan": ({"_class_name": "WuerstchenPrior"}, wj.StageCConfig.tiny(), {"depth": float("nan")}, "is nan"),
    "decoder-blocks": (
        {"_class_name": "WuerstchenDiffNeXt"},
        wj.StageBConfig.tiny(),
        {"blocks": [1, 1, 10**4, 1]},
        r"key 'blocks\[2\]' is 10000, beyond the sanity bound 112 \(8 × 14",
    ),
    "decoder-40-levels": (
        {"_class_name": "WuerstchenDiffNeXt"},
        wj.StageBConfig.tiny(),
        {"c_hidden": [8] * 40},
        r"key 'c_hidden' has 40 entries, beyond the sanity bound 32 \(8 × 4",
    ),
    "decoder-block-types-string": (
        {"_class_name": "WuerstchenDiffNeXt"},
        wj.StageBConfig.tiny(),
        {"level_config": ["CT", "CTA", "C" * 10**5, "CTA"]},
        r"key 'level_config\[2\]' has 100000 entries, beyond the sanity bound 24 \(8 × 3",
    ),
    "vqgan-bottleneck": (
        {"_class_name": "PaellaVQModel"},
        wj.StageAConfig.tiny(),
        {"bottleneck_blocks": 10**5},
        r"key 'bottleneck_blocks' is 100000, beyond the sanity bound 96 \(8 × 12",
    ),
    "cascade-layers": (
        {"_class_name": "StableCascadeUNet"},
        StableCascadeUNetConfig.tiny_prior(),
        {"down_num_layers_per_block": [1, 10**4]},
        r"key 'down_num_layers_per_block\[1\]' is 10000, beyond the sanity bound 224 \(8 × 28",
    ),
    "cascade-blocks-in-all": (  # each value within its bound, their product not
        {"_class_name": "StableCascadeUNet"},
        StableCascadeUNetConfig.tiny_prior(),
        {
            "down_num_layers_per_block": [200, 200],
            "up_num_layers_per_block": [200, 200],
            "up_blocks_repeat_mappers": [20, 20],
        },
        r"the config builds 25200 blocks, beyond the sanity bound 2960 \(8 × 370" + WHY,
    ),  # fmt: skip
    "controlnet-large-blocks": (
        {"_class_name": "StableCascadeControlNet"},
        ControlNetConfig.tiny(),
        {"large_blocks": 10**6},
        r"key 'large_blocks' is 1000000, beyond the sanity bound 64 \(8 × 8",
    ),
    "clip-text-layers": (
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
        wj.CLIPTextConfig.tiny(),
        {"num_hidden_layers": 10**6},
        r"key 'num_hidden_layers' is 1000000, beyond the sanity bound 256 \(8 × 32",
    ),
    "clip-vision-width": (
        {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model"},
        CLIPVisionConfig.tiny(),
        {"hidden_size": 10**7},
        r"key 'hidden_size' is 10000000, beyond the sanity bound 8192 \(8 × 1024",
    ),
    "effnet-width": (
        {"_class_name": "EfficientNetEncoder"},
        wj.EfficientNetConfig.tiny(),
        {"c_cond": 10**8},
        r"key 'c_cond' is 100000000, beyond the sanity bound 10240 \(8 × 1280",
    ),
}


def component(folder: Path, names: dict, config, overrides: dict) -> Path:
    """A component folder holding only config.json (no weights: a bound must refuse it before they are looked for)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**names, **dataclasses.asdict(config), **overrides}))
    return folder


@pytest.mark.parametrize("case", list(BOUND_CASES))
def test_config_beyond_the_sanity_bounds_is_refused_before_anything_is_built(tmp_path, case):
    names, config, overrides, problem = BOUND_CASES[case]
    folder = component(tmp_path / "c", names, config, overrides)
    for read in (read_config, wj.load_component):  # load_component would next want the (missing) weights
        with pytest.raises(wj.WeightsError) as e:
            read(folder)
        msg = str(e.value)
        assert msg.startswith(f"{folder / 'config.json'}: ") and re.search(problem, msg), msg
        assert "\n" not in msg and len(msg) < 300


def test_the_bounds_admit_every_released_and_tiny_config():
    from wurst_jax.models import registry

    for spec in registry.specs():
        for preset in (*spec.released, "tiny"):
            config = getattr(spec.config, preset)()
            bounds.check_values(spec.config, dataclasses.asdict(config), preset)
            bounds.check_blocks(config, preset)
    assert "| StageCConfig | depth | 256 | – |" in bounds.bounds_table()


def test_a_5000_digit_integer_in_config_json_names_the_file(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "WuerstchenPrior", "depth": ' + "9" * 5000 + "}")
    with pytest.raises(wj.WeightsError, match=re.escape(f"{folder / 'config.json'}: not valid JSON (ValueError: Exc")):
        read_config(folder)


def cli(argv: list[str], capsys) -> str:
    """`wurst-jax ARGV` in this process: exit 2 and one error line (returned), no traceback, nothing on stdout."""
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err and not out, (rc, out, err)
    return lines[0]


def safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_cli_convert_refuses_a_config_beyond_the_bounds(tmp_path, capsys):
    names, config, overrides, problem = BOUND_CASES["prior-depth-10**6"]
    folder = component(tmp_path / "prior", names, config, overrides)
    line = cli(["convert", str(folder), str(tmp_path / "out")], capsys)
    assert line.startswith(f"wurst-jax convert: error: {folder / 'config.json'}: key 'depth' is 1000000, beyond")
    weights = safetensors(
        tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
    )
    line = cli(
        ["convert", str(weights), str(tmp_path / "out"), "--stage", "prior", "--config", '{"depth": 100000}'], capsys
    )
    assert line == (
        "wurst-jax convert: error: --config JSON: key 'depth' is 100000, beyond the sanity bound 256 "
        "(8 × 32, the largest released model's)"
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior", "w.safetensors"]  # no out, no partial


def test_tiny_model_train_config_is_bounded_too():
    with pytest.raises(ValueError, match=re.escape("run.json: key 'model.stage_c.depth' is 1000000, beyond the sa")):
        tiny_config({"stage_c": {"depth": 10**6}}, name="run.json")
    with pytest.raises(ValueError, match=r"run.json: config section 'model.stage_b': the config builds 1600 blocks"):
        tiny_config({"stage_b": {"blocks": [100, 100, 100]}}, name="run.json")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ["C128", "C64", "complex128", "complex64", "complex32"])
def test_complex_tensors_are_refused_naming_file_and_tensor(tmp_path, dtype):
    """Never truncated to their real part: safetensors' C64 / C128 entries and torch's complex tensors."""
    if dtype.startswith("C"):
        size = {"C64": 8, "C128": 16}[dtype]
        header = {"z": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2 * size]}}
        src = safetensors(tmp_path / "x.safetensors", header, bytes(2 * size))
        problem = rf"{re.escape(str(src))}: tensor 'z' has an unsupported or malformed entry \(dtype '{dtype}'"
    else:
        src = tmp_path / "x.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save({"w": torch.zeros(2), "z": torch.zeros(2, dtype=getattr(torch, dtype))}, src)
        problem = rf"{re.escape(str(src))}: 1 tensor\(s\) cannot be converted: 'z' \({dtype}\)"
    with pytest.raises(wj.WeightsError, match=problem):
        convert_checkpoint(src, tmp_path / "out", stage="prior")
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_symlink_loops_as_convert_src_and_dst_and_prepare_out(tmp_path, capsys):
    decoder = str(TINY_MODEL / "wuerstchen" / "decoder")
    loop, inner = tmp_path / "loop", tmp_path / "sub" / "x"
    os.symlink("loop", loop)
    (tmp_path / "sub").mkdir()
    os.symlink("x", inner)
    error = "wurst-jax {}: error: {}: a symlink loop or an unreadable path (Symlink loop from '{}')"
    assert cli(["convert", str(loop), str(tmp_path / "out")], capsys) == error.format("convert", loop, loop)
    assert cli(["convert", decoder, str(loop), "--overwrite"], capsys) == error.format("convert", loop, loop)
    line = cli(["convert", decoder, str(inner / "y"), "--overwrite"], capsys)  # a loop in DST's parent
    assert line == error.format("convert", inner / "y", inner / "y")
    line = cli(["convert", decoder, str(loop)], capsys)  # without --overwrite: the link is something in the way
    assert line == f"wurst-jax convert: error: {loop}: already exists; pass --overwrite (overwrite=True) to replace it"
    line = cli(["prepare-data", str(tmp_path), str(loop), "--effnet", decoder, "--overwrite"], capsys)
    assert line == error.format("prepare-data", loop, loop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "sub"]  # nothing written
