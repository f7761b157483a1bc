"""The `wurst-jax` command line: `generate`, `convert`, `train`, `prepare-data`, `serve`.

Each subcommand lives in its own module (argument parsing next to the command); the library code they call lives
in the packages (`pipelines`, `weights`, `train`).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from wurst_jax.cli.convert import add_convert_parser, run_convert
    from wurst_jax.cli.generate import add_generate_parser, generate
    from wurst_jax.serving.server import add_serve_parser, run_serve
    from wurst_jax.train.cli import add_train_parser, run_train
    from wurst_jax.train.prepare import add_prepare_parser, run_prepare

    parser = argparse.ArgumentParser(prog="wurst-jax", description="Würstchen text-to-image in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_convert_parser(sub)
    add_train_parser(sub)
    add_prepare_parser(sub)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("convert", "prepare-data"):  # report their own errors (exit 2) and interruptions (130)
        return {"convert": run_convert, "prepare-data": run_prepare}[args.command](args)
    try:
        return {"generate": generate, "train": run_train, "serve": run_serve}[args.command](args)
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f"wurst-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The console entry (`wurst-jax`, `python -m wurst_jax.cli`): `main`, then, after `generate`, an immediate exit.
    Its images are written and closed by then; the interpreter's orderly shutdown (tearing down jax's runtime and
    collecting every traced object) only costs the user seconds. Multi-host runs exit normally, so jax's
    distributed client shuts down in order."""
    rc = main()
    argv = sys.argv[1:]
    if argv[:1] == ["generate"] and not {"--distributed", "--coordinator"} & {a.split("=")[0] for a in argv}:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
