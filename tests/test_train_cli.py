"""`wurst-jax train` end to end on a few steps: stages a → b → c, export, generate from the export; a stage stopped
by `max_seconds` and resumed."""

import json

import jax
from jax._src import compilation_cache
from PIL import Image

from wurst_jax.cli import main

# The smallest architecture the recipe builds (as tests/test_train.py's TINY, with the CLI's real tokenizer): these
# tests check the CLI's stages, resume, stop and export, none of which depends on the model's size; three semantic
# stages keep `resolution_multiple` 8.
MODEL = {
    "semantic_widths": [8, 8, 8],
    "stage_a": {"bottleneck_blocks": 1, "embed_dim": 16, "num_vq_embeddings": 32},
    "stage_b": {
        "c_hidden": [8, 16, 16],
        "nhead": [-1, 2, 2],
        "blocks": [1, 1, 1],
        "c_cond": 16,
        "clip_embd": 16,
        "patch_size": 1,
    },
    "stage_c": {"c": 32, "c_cond": 16, "c_r": 16, "depth": 1, "nhead": 2},
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
}


def test_train_export_generate(tmp_path):
    config = tmp_path / "run.json"
    run = {
        "out": str(tmp_path / "run"),
        "size": 32,
        "batch_size": 2,
        "log_every": 1,
        "ckpt_every": 1,
        "model": MODEL,
        "a": {"steps": 2},
        "b": {"steps": 1},
        "c": {"steps": 1, "data_workers": 1},
    }
    config.write_text(json.dumps(run))
    for stage in "abc":
        assert main(["train", "--stage", stage, "--config", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["step"]) for m in metrics] == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]
    # resuming a stage: test_max_seconds_stops_saves_and_a_second_run_continues
    export = tmp_path / "export"
    assert main(["train", "--config", str(config), "--export", str(export)]) == 0
    out = tmp_path / "img.png"
    args = [
        "generate",
        "a red circle on a blue background",
        "--model",
        str(export / "wuerstchen"),
        "--prior",
        str(export / "wuerstchen-prior"),
        "--out",
        str(out),
        "--prior-steps",
        "2",
        "--steps",
        "2",
        "--quiet",
    ]
    assert main(args) == 0
    with Image.open(out) as img:
        assert img.size == (32, 32)  # the model's own size, from its model_index.json
    index = json.loads((export / "wuerstchen-prior" / "model_index.json").read_text())
    assert index["resolution_multiple"] == 8.0  # three stride-2 stages in the semantic encoder
    prior = json.loads((export / "wuerstchen-prior" / "prior" / "config.json").read_text())
    assert prior["depth"] == 1


def test_train_config_errors(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"size": 64}))
    assert main(["train", "--stage", "a", "--config", str(config)]) == 2
    assert "needs an 'out' folder" in capsys.readouterr().err
    config.write_text(json.dumps({"out": str(tmp_path / "r"), "a": {"stepz": 3}}))
    assert main(["train", "--stage", "a", "--config", str(config)]) == 2
    assert "unknown keys ['stepz']" in capsys.readouterr().err


def test_train_model_section_errors(tmp_path, capsys):
    config = tmp_path / "run.json"
    for model, message in [
        ({"stage_c": {"width": 3}}, "'model.stage_c': unknown keys ['width']"),
        ({"semantic_width": [8]}, "'model': unknown keys ['semantic_width']"),
    ]:
        config.write_text(json.dumps({"out": str(tmp_path / "r"), "model": model}))
        assert main(["train", "--stage", "a", "--config", str(config)]) == 2
        assert message in capsys.readouterr().err


def test_max_seconds_stops_saves_and_a_second_run_continues(tmp_path, capsys):
    config, out = tmp_path / "run.json", tmp_path / "run"
    run = {"out": str(out), "size": 32, "model": MODEL, "batch_size": 2, "log_every": 10, "ckpt_every": 10}
    run["a"] = {"steps": 3}
    config.write_text(json.dumps({**run, "max_seconds": 0}))  # stops after its first step
    assert main(["train", "--stage", "a", "--config", str(config)]) == 0
    assert "stage a: stopped at step 1 of 3" in capsys.readouterr().out
    assert (out / "variables").is_dir() and not (out / "stage_a.done").exists()  # saved, not marked done
    config.write_text(json.dumps(run))
    try:
        assert main(["train", "--stage", "a", "--config", str(config), "--cache-dir", str(tmp_path / "cache")]) == 0
    finally:  # the cache is process-wide: later tests compile as before
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    assert "stage a: resumed at step 1" in capsys.readouterr().out
    assert any((tmp_path / "cache").iterdir())  # the compiled step persisted for the next process
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 3] and (out / "stage_a.done").exists()
