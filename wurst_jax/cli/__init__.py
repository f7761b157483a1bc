"""The `wurst-jax` command line: `generate`, `convert`, `train`, `prepare-data`, `serve`.

Each subcommand lives in its own module (argument parsing next to the command); the library code they call lives
in the packages (`pipelines`, `weights`, `train`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    # transformers prints "PyTorch was not found" on import when torch is absent (torch is optional here)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from wurst_jax.cli.convert import add_convert_parser, run_convert
    from wurst_jax.cli.generate import add_generate_parser, generate
    from wurst_jax.serving.server import add_serve_parser, run_serve
    from wurst_jax.train.cli import add_train_parser, run_train
    from wurst_jax.train.prepare import add_prepare_parser, run_prepare

    parser = argparse.ArgumentParser(prog="wurst-jax", description="Würstchen text-to-image in JAX/Flax")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_convert_parser(sub)
    add_train_parser(sub)
    add_prepare_parser(sub)
    add_serve_parser(sub)
    for p in sub.choices.values():  # `--debug` after the subcommand as well
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    commands = {
        "generate": generate,
        "convert": run_convert,
        "train": run_train,
        "prepare-data": run_prepare,
        "serve": run_serve,
    }
    try:  # convert and prepare-data report their own errors (exit 2) and interruptions (130)
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"wurst-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        if args.debug:
            traceback.print_exc()
        print(f"wurst-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # anything unexpected: the same one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        print(f"wurst-jax {args.command}: error: {_one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
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
