"""`wurst-jax convert SRC DST`: PyTorch checkpoints → converted folders (see `wurst_jax.weights.converted`)."""

from __future__ import annotations

import argparse
import sys

from wurst_jax.dtypes import DTYPES
from wurst_jax.models import registry
from wurst_jax.output_dir import run_writer
from wurst_jax.weights.sources import PICKLE_SUFFIXES

__all__ = ["PICKLE_SUFFIXES", "add_convert_arguments", "add_convert_parser", "main", "run_convert"]


def add_convert_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `wurst-jax convert` (shared with the scripts in convert/)."""
    p.add_argument("src", metavar="SRC", help="diffusers pipeline or component folder, original .pt or .safetensors")
    p.add_argument("dst", metavar="DST", help="output folder (same layout as SRC: config.json + orbax/ per component)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="stored parameter dtype (float32)")
    p.add_argument(
        "--components",
        type=lambda s: [c for c in s.split(",") if c],
        help="comma-separated component folders of a pipeline to convert (default: all); others are copied",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (once the new one is complete)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/Inf weights with a warning")
    p.add_argument(
        "--stage",
        choices=registry.single_file_stages(),
        help="component of a single .pt / .safetensors file (effnet / effnet_encoder: the semantic encoder; "
        "stage_c / stage_b: Stable Cascade's, full or lite read off the tensors)",
    )
    p.add_argument("--variant", help="read a folder's variant weight files, e.g. bf16 (diffusion_pytorch_model.bf16…)")
    p.add_argument("--config", help="config.json path or JSON for a single file (default: the released model's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `convert` subcommand on `subparsers` (run it with `run_convert(args)`)."""
    from wurst_jax.weights import converted

    p = subparsers.add_parser(
        "convert",
        help="convert PyTorch checkpoints into folders that load without conversion",
        description=converted.__doc__.split("\n\n")[0],
    )
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command: 0 on success, 2 for bad input, 130 when interrupted."""
    from wurst_jax.weights.converted import convert_checkpoint

    return run_writer(
        "convert",
        args.dst,
        lambda: convert_checkpoint(
            args.src,
            args.dst,
            dtype=args.dtype,
            components=args.components,
            overwrite=args.overwrite,
            nonfinite="warn" if args.allow_nonfinite else "error",
            stage=args.stage,
            config=args.config,
            progress=not args.quiet,
            variant=args.variant,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m wurst_jax.cli.convert SRC DST ...`, the same as `wurst-jax convert`."""
    parser = add_convert_arguments(argparse.ArgumentParser(prog="wurst-jax convert"))
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
