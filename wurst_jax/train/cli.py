"""`wurst-jax train`: train the tiny Würstchen from scratch, stage by stage, resumable, and export it; or
fine-tune a converted / diffusers-layout checkpoint on your own data.

The config is a JSON file (see `wurst_jax/train/configs/tiny.json`): `out` (run folder), `size`, and per-stage
run settings (`steps`, `batch_size`, `lr`, `warmup_steps`, `ema_decay`, `cond_dropout`, `seed`, `log_every`,
`ckpt_every`, `data_workers`, `max_seconds`), either at top level or under "a" / "b" / "c", and optionally the
architecture under "model" (`wurst_jax.tiny.recipe.tiny_config`). After each stage the variables of all components
are saved with orbax in `out/variables`; the next stage starts from them, and an interrupted stage resumes from
its own checkpoints (`out/ckpt_<stage>`).

Fine-tuning (`wurst_jax/train/finetune.py`, example `wurst_jax/train/configs/finetune_prior.json`): a config with
`init` — the pipeline folder to start from (a prior pipeline for `--stage c`, a decoder pipeline for b and a) —
and `data` — a folder of `.npz` shards (format in finetune.py) — plus optionally `dtype` (compute, "float32" or
"bfloat16"; default float32), `save_dtype` (the exported component; default float32), `sharding` ("dp" or
"fsdp" over all devices; with `lora_rank` too), `lora_rank` / `lora_targets` / `train_tokens` (a LoRA; with a
Stable Cascade prior also ReToken rows) and the run settings above (no `size`, `model` or `data_workers`). Any
other key is an error. It trains the one stage's component, resumes from `out/ckpt_<stage>`, and leaves `out/` a
pipeline folder diffusers loads (a LoRA: its file).

`--stage c-controlnet` trains a Stable Cascade stage C ControlNet with stage C frozen: a fine-tune config with a
"controlnet" object (`wurst_jax/controlnet/train.py`, example `wurst_jax/train/configs/controlnet_canny.json`).

Either config is checked whole (`wurst_jax/train/config.py`: keys, types, ranges) before any model is built or any
weights are read; a bad one is one error line naming the file and the key.
"""

from __future__ import annotations

import argparse
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
        choices=("a", "a-decoder", "b", "c", "c-controlnet"),
        help="the stage to train (tiny model: needs the earlier ones done; a fine-tune: a, b or c; c-controlnet: a "
        "Stable Cascade stage C ControlNet, config with 'init', 'data' and 'controlnet')",
    )
    p.add_argument(
        "--config",
        required=True,
        help="JSON run config (e.g. wurst_jax/train/configs/tiny.json, or finetune_prior.json to fine-tune)",
    )
    p.add_argument("--export", metavar="DIR", help="write DIR/wuerstchen and DIR/wuerstchen-prior (bf16 safetensors)")
    add_lora_flags(p)
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="persistent compilation cache: a resumed or repeated run skips compiling the train step again "
        "(default: $WURST_JAX_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /wurst_jax/jax)",
    )
    p.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora-rank", type=int, metavar="R", help="fine-tune a LoRA of rank R (stage c) instead of all weights"
    )
    p.add_argument("--lora-targets", choices=("attention", "all-linear"), help="the layers the LoRA adapts")
    p.add_argument(
        "--train-tokens",
        action="append",
        metavar="TOKEN[,REGEX]",
        help="a Stable Cascade LoRA also trains ReToken rows (repeatable): a new '[name]' / '<name>' token, its "
        "initial embedding the mean of the tokens matching REGEX (e.g. '[fernando],^dog</w>'), or a regex selecting "
        "existing tokens; replaces the config's 'train_tokens'",
    )


def with_lora_flags(raw: dict, args: argparse.Namespace) -> dict:
    """The config with --lora-rank / --lora-targets / --train-tokens on top (checked with the rest by
    `finetune_config`)."""
    flags = {"lora_rank": args.lora_rank, "lora_targets": args.lora_targets}
    if getattr(args, "train_tokens", None):
        from wurst_jax.train.config import train_token_flags

        flags["train_tokens"] = train_token_flags(args.train_tokens)
    return {**raw, **{k: v for k, v in flags.items() if v is not None}}


def run_train(args: argparse.Namespace) -> int:
    """The config is read and checked whole before anything is built or read (`train/config.py`)."""
    from wurst_jax.train.config import finetune_config, is_finetune, read_config, tiny_run_config

    raw = read_config(args.config)
    if is_finetune(raw):
        if args.export:
            raise ValueError("--export is for the tiny model; a fine-tune writes its pipeline folder to 'out'")
        raw = with_lora_flags(raw, args)
        cfg = finetune_config(raw, args.stage, args.config)
        _compilation_cache(args)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        if cfg.stage == "c-controlnet":
            from wurst_jax.controlnet.train import train_controlnet

            train_controlnet(cfg)
            return 0
        from wurst_jax.train.finetune import finetune

        finetune(cfg)
        return 0
    if args.lora_rank is not None or args.train_tokens:
        flag = "--lora-rank" if args.lora_rank is not None else "--train-tokens"
        raise ValueError(f"{flag} fine-tunes a checkpoint: pass a config with 'init' and 'data'")
    if not args.stage and not args.export:
        raise ValueError("nothing to do: pass --stage and/or --export")
    tiny = tiny_run_config(raw, args.stage, args.config)
    from wurst_jax.tiny.recipe import tiny_config

    cfg = tiny_config(tiny.model, tiny.size, args.config)  # the architecture, checked before anything is built
    _compilation_cache(args)
    return _run_tiny(args, tiny, cfg)


def _compilation_cache(args: argparse.Namespace) -> None:
    from wurst_jax.pipelines.runtime import use_compilation_cache

    use_compilation_cache(args.cache_dir, enabled=not args.no_cache)


def _run_tiny(args: argparse.Namespace, tiny, cfg) -> int:
    from transformers import AutoTokenizer

    from wurst_jax.tiny.recipe import export, init_variables, modules, train_stage
    from wurst_jax.weights.orbax_io import restore_variables, save_variables

    out = Path(tiny.out)
    out.mkdir(parents=True, exist_ok=True)
    saved, init = out / "variables", lambda: init_variables(cfg, modules(cfg), tiny.seed)
    variables = restore_variables(saved, jax.eval_shape(init)) if saved.exists() else init()  # shapes only to restore
    if args.stage:
        tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
        run = tiny.run
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
    return 0
