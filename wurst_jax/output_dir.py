"""Folders that appear whole or not at all: written under a temporary name next to the destination and renamed
into place when complete. `wurst-jax convert` and `wurst-jax prepare-data` write their outputs this way."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
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
