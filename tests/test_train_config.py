"""`wurst-jax train` configs are checked whole before anything is built: every bad key, type, range or section is
one error line naming the file and the key, exit code 2, no traceback, and no model made or weights read."""

import json
import os
import subprocess
import sys
import time

import pytest

import wurst_jax.tiny.recipe as recipe
import wurst_jax.train.finetune as finetune
import wurst_jax.weights as weights
from wurst_jax.cli import main
from wurst_jax.train.config import RunConfig, finetune_config, read_config, tiny_run_config

FINETUNE = {"init": "init_dir", "data": "data_dir"}

# (config, the key the error names, what it says); each is run as `train --stage c --config F`
CASES = [
    ({"lerning_rate": 1e-3}, "lerning_rate", "unknown keys ['lerning_rate']"),
    ({"lr": "fast"}, "'lr'", "key 'lr' must be a number > 0, got 'fast'"),
    ({"lr": 0}, "'lr'", "key 'lr' must be a number > 0, got 0"),
    ({"lr": -1e-3}, "'lr'", "key 'lr' must be a number > 0"),
    ({"lr": float("nan")}, "'lr'", "key 'lr' must be a number > 0, got nan"),
    ({"lr": float("inf")}, "'lr'", "key 'lr' must be a number > 0, got inf"),
    ({"lr": True}, "'lr'", "key 'lr' must be a number > 0, got True"),
    ({"steps": 0}, "'steps'", "key 'steps' must be an integer >= 1, got 0"),
    ({"c": {"steps": -5}}, "'steps'", "section 'c': key 'steps' must be an integer >= 1, got -5"),
    ({"steps": 2.5}, "'steps'", "key 'steps' must be an integer >= 1, got 2.5"),
    ({"batch_size": 0}, "'batch_size'", "key 'batch_size' must be an integer >= 1"),
    ({"warmup_steps": -1}, "'warmup_steps'", "key 'warmup_steps' must be an integer >= 0"),
    ({"ckpt_every": 0}, "'ckpt_every'", "key 'ckpt_every' must be an integer >= 1, got 0"),
    ({"b": {"log_every": 0}}, "'log_every'", "section 'b': key 'log_every' must be an integer >= 1"),
    ({"ema_decay": 1.5}, "'ema_decay'", "key 'ema_decay' must be a number in [0, 1)"),
    ({"cond_dropout": "0.1"}, "'cond_dropout'", "key 'cond_dropout' must be a number in [0, 1]"),
    ({"loss_weighting": "l2"}, "'loss_weighting'", "key 'loss_weighting' must be 'p2' or 'v', got 'l2'"),
    ({"seed": "zero"}, "'seed'", "key 'seed' must be an integer >= 0"),
    ({"data_workers": -2}, "'data_workers'", "key 'data_workers' must be an integer >= 0"),
    ({"max_seconds": "1h"}, "'max_seconds'", "key 'max_seconds' must be a number >= 0, got '1h'"),
    ({"c": 5}, "'c'", "section 'c' must be an object of run settings, got 5"),
    ({"a-decoder": {"lr": "fast"}}, "'lr'", "section 'a-decoder': key 'lr' must be a number > 0"),
    ({"out": 5}, "'out'", "key 'out' must be a non-empty string"),
    ({"size": "64"}, "'size'", "key 'size' must be an integer >= 8"),
    ({"size": 60}, "'size'", "key 'size' must be a multiple of 8"),
    ({"model": 5}, "'model'", "key 'model' must be an object"),
    ({"model": {"stage_c": 5}}, "'model.stage_c'", "key 'model.stage_c' must be an object, got 5"),
    ({"model": {"stage_c": {"depth": "deep"}}}, "'model.stage_c.depth'", "must be an integer, got 'deep'"),
    ({"model": {"stage_b": {"c_hidden": [8, "x"]}}}, "'model.stage_b.c_hidden'", "a list of integers, got [8, 'x']"),
    ({"model": {"semantic_widths": 8}}, "'model.semantic_widths'", "must be a list of integers >= 1"),
    ({"model": {"decoder_guidance": "high"}}, "'model.decoder_guidance'", "must be a number >= 0"),
    ({**FINETUNE, "lr": "fast"}, "'lr'", "key 'lr' must be a number > 0, got 'fast'"),
    ({**FINETUNE, "c": 5}, "'c'", "section 'c' must be an object of run settings, got 5"),
    ({**FINETUNE, "c": {"ckpt_every": 0}}, "'ckpt_every'", "section 'c': key 'ckpt_every' must be an integer >= 1"),
    ({**FINETUNE, "dtype": "float16"}, "'dtype'", "key 'dtype' must be 'float32' or 'bfloat16', got 'float16'"),
    ({**FINETUNE, "sharding": "tp"}, "'sharding'", "key 'sharding' must be 'dp' or 'fsdp', got 'tp'"),
    ({**FINETUNE, "scan_blocks": 1}, "'scan_blocks'", "key 'scan_blocks' must be true or false, got 1"),
    ({**FINETUNE, "data": 5}, "'data'", "key 'data' must be a non-empty string"),
    ({**FINETUNE, "steps": 0}, "'steps'", "key 'steps' must be an integer >= 1, got 0"),
]
# not JSON objects at all: the file is named
RAW_CASES = [
    ("5", "a config must be a JSON object ({...}), got 5"),
    ('["out"]', "a config must be a JSON object"),
    ('{"out": "r", "lr": 1e-3,}', "not valid JSON"),
    ("", "not valid JSON"),
]


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a model, reading weights or starting a run fails the test: a bad config must stop before."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built or weights were read before the config was checked")

    for module, name in [
        (recipe, "modules"),
        (recipe, "init_variables"),
        (recipe, "train_stage"),
        (finetune, "finetune"),
        (weights, "load_component"),
    ]:
        monkeypatch.setattr(module, name, built)


def train_error(config_path, capsys, stage="c") -> str:
    """Run `wurst-jax train` in this process: exit code 2 and exactly one error line, returned; well under a
    second (nothing is built)."""
    t0 = time.perf_counter()
    code = main(["train", "--stage", stage, "--config", str(config_path)])
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert seconds < 1.0, seconds  # a config check, not a setup
    return lines[0]


@pytest.mark.parametrize("config, key, message", CASES, ids=[str(c[0])[:40] for c in CASES])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, capsys, nothing_built, config, key, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"out": str(tmp_path / "out"), **config}))
    line = train_error(path, capsys)
    assert line.startswith(f"wurst-jax train: error: {path}: "), line
    assert key in line and message in line, line
    assert not (tmp_path / "out").exists()  # nothing made


@pytest.mark.parametrize("text, message", RAW_CASES, ids=["int", "list", "trailing comma", "empty"])
def test_a_file_that_is_no_config_object_is_named(tmp_path, capsys, nothing_built, text, message):
    path = tmp_path / "run.json"
    path.write_text(text)
    line = train_error(path, capsys)
    assert line.startswith(f"wurst-jax train: error: {path}: ") and message in line, line


def test_missing_config_file_is_named(tmp_path, capsys, nothing_built):
    line = train_error(tmp_path / "nope.json", capsys)
    assert f"{tmp_path / 'nope.json'}: cannot read the config" in line


def test_the_command_line_exits_2_with_one_line(tmp_path):
    """The real `python -m wurst_jax.cli train`: a config that is `5`, a bad value, a section that is `5` (which
    used to fail after 31 s of setup)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    for name, text, key in [
        ("int.json", "5", "must be a JSON object"),
        ("lr.json", json.dumps({"out": str(tmp_path / "o"), "c": {"lr": "fast"}}), "section 'c': key 'lr'"),
        ("section.json", json.dumps({"out": str(tmp_path / "o"), "c": 5}), "section 'c' must be an object"),
    ]:
        path = tmp_path / name
        path.write_text(text)
        cmd = [sys.executable, "-m", "wurst_jax.cli", "train", "--stage", "c", "--config", str(path)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert lines[0].startswith(f"wurst-jax train: error: {path}: ") and key in lines[0], lines


def test_good_configs_parse_to_their_settings(tmp_path):
    """The shipped configs and the merge order (top level, then the stage's section)."""
    root = os.path.join(os.path.dirname(recipe.__file__), "..", "train", "configs")
    tiny = tiny_run_config(read_config(os.path.join(root, "tiny.json")), "a", "tiny.json")
    assert tiny.run == RunConfig(
        steps=600, batch_size=32, lr=0.001, warmup_steps=100, ema_decay=0.995, log_every=50, ckpt_every=250
    )
    assert (tiny.out, tiny.size, tiny.model, tiny.seed) == ("runs/tiny", 64, {}, 0)
    assert tiny_run_config(read_config(os.path.join(root, "tiny.json")), None, "tiny.json").run is None
    ft = finetune_config(read_config(os.path.join(root, "finetune_prior.json")), "c", "finetune_prior.json")
    assert (ft.stage, ft.dtype, ft.sharding, ft.run.steps, ft.run.lr, ft.run.batch_size) == (
        "c", "bfloat16", "fsdp", 4000, 1e-5, 16
    )  # fmt: skip
    raw = {"out": "o", "max_seconds": None, "lr": 1, "c": {"max_seconds": 2.5}}
    assert tiny_run_config(raw, "c").run == RunConfig(lr=1, max_seconds=2.5)
    assert tiny_run_config(raw, "b").run == RunConfig(lr=1, max_seconds=None)
