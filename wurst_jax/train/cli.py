"""`wurst-jax train`: train the tiny Würstchen from scratch, stage by stage, resumable, and export it; or
fine-tune a converted / diffusers-layout checkpoint on your own data.

The config is a JSON file (see `wurst_jax/train/configs/tiny.json`): `out` (run folder), `size`, and per-stage
run settings (`steps`, `batch_size`, `lr`, `warmup_steps`, `ema_decay`, `cond_dropout`, `seed`, `log_every`,
`ckpt_every`, `data_workers`, `max_seconds`), either at top level or under "a" / "b" / "c", and optionally the
architecture under "model" (`tiny.tiny_config`). After each stage the variables of all components
are saved with orbax in `out/variables`; the next stage starts from them, and an interrupted stage resumes from
its own checkpoints (`out/ckpt_<stage>`).

Fine-tuning (`wurst_jax/train/finetune.py`, example `wurst_jax/train/configs/finetune_prior.json`): a config with
`init` — the pipeline folder to start from (a prior pipeline for `--stage c`, a decoder pipeline for b and a) —
and `data` — a folder of `.npz` shards (format in finetune.py) — plus optionally `dtype` (compute, "float32" or
"bfloat16"; default float32), `save_dtype` (the exported component; default float32), `sharding` ("dp" or
"fsdp" over all devices) and the run settings above (no `size`, `model` or `data_workers`). Any other key is an
error. It trains the one stage's component, resumes from `out/ckpt_<stage>`, and leaves `out/` a pipeline folder
diffusers loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import jax

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the tiny Würstchen (stages a, b, c) on the procedural shapes dataset, or fine-tune a "
        "checkpoint on .npz shards (a config with 'init' and 'data')",
    )
    p.add_argument(
        "--stage",
        choices=("a", "a-decoder", "b", "c"),
        help="the stage to train (tiny model: needs the earlier ones done; a fine-tune: a, b or c)",
    )
    p.add_argument(
        "--config",
        required=True,
        help="JSON run config (e.g. wurst_jax/train/configs/tiny.json, or finetune_prior.json to fine-tune)",
    )
    p.add_argument("--export", metavar="DIR", help="write DIR/wuerstchen and DIR/wuerstchen-prior (bf16 safetensors)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="persistent compilation cache: a resumed or repeated run skips compiling the train step again",
    )


def _run_config(raw: dict, stage: str):
    from wurst_jax.tiny.recipe import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    merged = {**{k: v for k, v in raw.items() if k in fields}, **raw.get(stage, {})}
    unknown = set(raw.get(stage, {})) - fields
    if unknown:
        raise ValueError(f"config section {stage!r}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return RunConfig(**merged)


def run_train(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from wurst_jax.train.finetune import is_finetune
    from wurst_jax.tiny.recipe import export, init_variables, modules, tiny_config, train_stage
    from wurst_jax.weights.orbax_io import restore_variables, save_variables

    if args.cache_dir:
        from wurst_jax.pipeline_io import enable_compilation_cache

        enable_compilation_cache(args.cache_dir)
    raw = json.loads(Path(args.config).read_text())
    if "out" not in raw:
        raise ValueError(f"{args.config}: needs an 'out' folder")
    if is_finetune(raw):
        return _run_finetune(args, raw)
    out = Path(raw["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(raw.get("model"), raw.get("size", 64))
    saved, init = out / "variables", lambda: init_variables(cfg, modules(cfg), raw.get("seed", 0))
    variables = restore_variables(saved, jax.eval_shape(init)) if saved.exists() else init()  # shapes only to restore
    if args.stage:
        tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
        run = _run_config(raw, args.stage)
        variables, reached = train_stage(args.stage, cfg, variables, tokenizer, run, out)
        tmp = out / "variables.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_variables(variables, tmp)
        shutil.rmtree(saved, ignore_errors=True)
        tmp.rename(saved)
        if reached >= run.steps:  # a stage stopped by max_seconds is saved as far as it got, not marked done
            (out / f"stage_{args.stage}.done").write_text("ok\n")
    if args.export:
        for d in export(cfg, variables, ASSETS / "tokenizer", args.export):
            print(d)
    if not args.stage and not args.export:
        raise ValueError("nothing to do: pass --stage and/or --export")
    return 0


def _run_finetune(args: argparse.Namespace, raw: dict) -> int:
    from wurst_jax.train.finetune import finetune, finetune_config

    if args.export:
        raise ValueError("--export is for the tiny model; a fine-tune writes its pipeline folder to 'out'")
    if not args.stage:
        raise ValueError(f"{args.config}: a fine-tune (a config with 'init') needs --stage a, b or c")
    cfg = finetune_config(raw, args.stage, args.config)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    finetune(cfg)
    return 0
