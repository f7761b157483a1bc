"""`wurst-jax generate --lora PATH[:SCALE] [--train-tokens TOKEN[,REGEX] ...]`: LoRA files loaded into the pipeline
before it runs (`LoraMixin.load_lora_weights`), each checked before any weights are read.

`--lora` is repeatable (one adapter each, scale 1 by default); a file is diffusers/PEFT's (v2) or the original
Stable Cascade `lora.safetensors`, or a folder holding one. `--train-tokens` (repeatable) belong to the `--lora`
given before them: the original training's `train_tokens`, which add its `[name]` / `<name>` tokens to the
tokenizer before its ReToken rows apply (Stable Cascade only).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


class _InOrder(argparse.Action):
    """Both flags append (flag, value) to one list, so each --train-tokens knows the --lora before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((option_string, values))
        setattr(namespace, self.dest, items)


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        dest="lora_flags",
        action=_InOrder,
        metavar="PATH[:SCALE]",
        help="load a LoRA file (or a folder with one) at SCALE (default 1); repeatable: one adapter each",
    )
    p.add_argument(
        "--train-tokens",
        dest="lora_flags",
        action=_InOrder,
        metavar="TOKEN[,REGEX]",
        help="Stable Cascade: a train token of the --lora before it (the original's train_tokens, e.g. "
        "'[fernando],^dog</w>'); repeatable",
    )


def lora_options(args: argparse.Namespace, cascade: bool) -> list[tuple[Path, float, list | None]]:
    """[(path, scale, train_tokens or None)] in flag order; a ValueError (exit 2) names the flag and the value."""
    from wurst_jax.train.config import train_token_flags

    entries: list[list[Any]] = []
    for flag, value in getattr(args, "lora_flags", None) or []:
        if flag == "--lora":
            entries.append([*_path_and_scale(value), []])
        elif not entries:
            raise ValueError(f"--train-tokens {value!r} belongs to a LoRA file: give --lora PATH before it")
        elif not cascade:
            raise ValueError("--train-tokens is for original Stable Cascade LoRA files: needs a StableCascade --model")
        else:
            entries[-1][2] += train_token_flags([value])
    return [(path, scale, tokens or None) for path, scale, tokens in entries]


def _path_and_scale(value: str) -> tuple[Path, float]:
    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            head = ""  # a colon inside the path itself
        else:
            path = head
    if not math.isfinite(scale):
        raise ValueError(f"--lora {value!r}: the scale must be a finite number")
    p = Path(path)
    if not (p.is_dir() or (p.is_file() and p.suffix == ".safetensors")):
        raise ValueError(f"--lora {value!r}: {path} is neither a .safetensors file nor a folder")
    return p, scale


def load_loras(pipe: Any, entries: list[tuple[Path, float, list | None]]) -> None:
    """Each entry as adapter `lora_<i>` at its scale (a file that does not fit raises one LoraError)."""
    for i, (path, scale, tokens) in enumerate(entries):
        extra = {} if tokens is None else {"train_tokens": tokens}
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}", scale=scale, **extra)
