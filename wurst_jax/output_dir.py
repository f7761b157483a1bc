"""Folders that appear whole or not at all: written under a temporary name next to the destination and renamed
into place when complete. `wurst-jax convert` and `wurst-jax prepare-data` write their outputs this way."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an existing `dst` (unless `overwrite`) and a `dst` that is `src`, inside it, or contains it."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")
    s, d = src.resolve(), dst.resolve()
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        raise ValueError(f"{dst}: the output must not be the source {src}, inside it, or contain it")


@contextlib.contextmanager
def staged_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to `dst`; on a clean exit it becomes `dst`, on any exception
    (KeyboardInterrupt included) it is removed and an existing `dst` is left untouched."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise OSError(f"{dst}: cannot write the output in {dst.parent} ({e.strerror or e})") from None
    try:
        yield tmp
        _commit(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old `dst` is moved aside first and deleted only afterwards."""
    if not (dst.exists() or dst.is_symlink()):
        os.replace(tmp, dst)
        return
    if not overwrite:  # created while we were writing
        raise FileExistsError(f"{dst}: appeared while the output was being written; pass --overwrite to replace it")
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def run_writer(command: str, out: str, write: Callable[[], Path]) -> int:
    """Run a command that writes `out` this way: prints the folder and returns 0; bad input prints one
    `wurst-jax COMMAND: error: …` line and returns 2; Ctrl-C says nothing was written and returns 130."""
    try:
        result = write()
    except KeyboardInterrupt:
        print(f"wurst-jax {command}: interrupted; {out} was not written or changed", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # WeightsError is a ValueError: one clear message, no traceback
        print(f"wurst-jax {command}: error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0
