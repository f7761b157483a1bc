"""The `wurst-jax` command line: `generate`, `convert`, `train`, `prepare-data`, `serve`.

Each subcommand lives in its own module (argument parsing next to the command); the library code they call lives
in the packages (`pipelines`, `weights`, `train`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from wurst_jax import output_dir


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


COMMANDS = ("generate", "convert", "train", "prepare-data", "serve")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _name(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return _interrupted(name)
    except Exception:
        # a Ctrl-C while a C extension is imported surfaces as its ImportError ("error while initializing the
        # extension"), one during a command as whatever it interrupted: a recorded signal makes it an interruption
        if output_dir.interrupted():
            return _interrupted(name)
        raise


def _name(argv: list[str]) -> str:
    return f"wurst-jax {argv[0]}" if argv and argv[0] in COMMANDS else "wurst-jax"


def _interrupted(name: str) -> int:
    print(f"{name}: interrupted", file=sys.stderr)
    return output_dir.interrupted() or 130


def _main(argv: list[str]) -> int:
    # transformers prints "PyTorch was not found" on import when torch is absent (torch is optional here)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from wurst_jax.cli.convert import add_convert_parser, run_convert
    from wurst_jax.cli.generate import add_generate_parser, generate
    from wurst_jax.serving.server import add_serve_parser, run_serve
    from wurst_jax.train.cli import add_train_parser, run_train
    from wurst_jax.train.prepare import add_prepare_parser, run_prepare

    output_dir.check_interrupted()  # a Ctrl-C during the imports whose KeyboardInterrupt an XLA GC callback ate
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
    _warnings_to_stderr(f"wurst-jax {args.command}")
    output_dir.release_signals()  # a Ctrl-C during the imports (its KeyboardInterrupt maybe eaten) raises here
    try:  # convert and prepare-data report their own errors (exit 2) and interruptions (130)
        return commands[args.command](args)
    except KeyboardInterrupt:
        return _interrupted(f"wurst-jax {args.command}")
    except Exception as e:
        if output_dir.interrupted():  # a signal became some other error on its way up: still an interruption
            return _interrupted(f"wurst-jax {args.command}")
        if args.debug:
            traceback.print_exc()
        hint = "" if isinstance(e, (ValueError, OSError)) else " (run with --debug for the traceback)"
        # bad input (ValueError, OSError): one clear line, no traceback; anything unexpected the same, and --debug
        # shows where it came from
        print(f"wurst-jax {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2


class _Warnings(logging.Handler):
    """The library's `wurst_jax` log warnings as `wurst-jax COMMAND: warning: …` lines on the current stderr."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(f"{name}: warning: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _warnings_to_stderr(name: str) -> None:
    log = logging.getLogger("wurst_jax")
    for h in [h for h in log.handlers if isinstance(h, _Warnings)]:  # the previous command's, in this process
        log.removeHandler(h)
    log.addHandler(_Warnings(name))


def run() -> None:
    """The console entry (`wurst-jax`, `python -m wurst_jax.cli`): signals recorded from the first moment, `main`,
    then, after `generate` or an interruption, an immediate exit.

    After `generate` its images are written and closed; the interpreter's orderly shutdown (tearing down jax's
    runtime and collecting every traced object) only costs the user seconds. After an interruption (exit 130 / 143)
    the temporary folders are already removed, and the shutdown is where an interrupted process can crash: a
    KeyboardInterrupt raised in the middle of an import or of XLA's Python callbacks leaves half-built state (a
    SIGSEGV after "interrupted"), and one that passed through an extension's `PyRun_*` makes CPython end the
    process with SIGINT whatever `main` returned. Multi-host runs that finish exit normally, so jax's distributed
    client shuts down in order."""
    argv = sys.argv[1:]
    try:
        output_dir.record_signals()  # first, before the imports: a Ctrl-C from now on is reported in one line
        rc = main(argv)
    except KeyboardInterrupt:  # one that arrived before main's own handling began
        rc = _interrupted(_name(argv))
    generate = argv[:1] == ["generate"] and not {"--distributed", "--coordinator"} & {a.split("=")[0] for a in argv}
    if generate or rc in output_dir.EXIT_CODES.values():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
