"""Folders that appear whole or not at all: written under a temporary name next to the destination and renamed
into place when complete. `wurst-jax convert` and `wurst-jax prepare-data` write their outputs this way.

Interruption: `run_writer` installs a SIGINT / SIGTERM handler around the whole command that records the signal
before raising KeyboardInterrupt. A KeyboardInterrupt can be swallowed (one raised inside an XLA or GC callback is
caught there), the record cannot: `staged_folder` checks it before the rename, so an interrupted run never
replaces DST, and `run_writer` reports it whatever became of the exception. Temporary folders
(`.DST.partial-PID-*`) left by a killed process are removed by the next run that writes DST. The console entry
records signals the same way from its first line (`record_signals`), through the seconds of importing jax, until
the command starts (`release_signals`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an existing `dst` (unless `overwrite`) and a `dst` that is `src`, inside it, or contains it."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")
    s, d = _resolve(src), _resolve(dst)
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        raise ValueError(f"{dst}: the output must not be the source {src}, inside it, or contain it")


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_signals: list[int] = []  # signals received while a `run_writer` command runs


def _on_signal(signum: int, frame: object) -> None:
    first = not _signals
    _signals.append(signum)
    if first:  # later signals only add to the record: the first KeyboardInterrupt is already unwinding
        # the interrupted work's coroutines (orbax's) are dropped unawaited: the process is ending, not a bug to show
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        raise KeyboardInterrupt


def _quiet_unraisable(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`hook` (a `sys.unraisablehook`) but silent once a signal was recorded: its KeyboardInterrupt landing in a GC
    callback (XLA's), or the `__del__` of an object it interrupted half-built (an asyncio loop orbax was creating),
    would print "Exception ignored in …" with a traceback; the interruption is reported once, as what it is."""

    def unraisable(u: Any) -> None:
        if not _signals:
            hook(u)

    unraisable.wrapped = hook
    return unraisable


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a symlink loop
        raise ValueError(f"{path}: a symlink loop or an unreadable path ({' '.join(str(e).split())})") from None


_before: dict[int, Any] = {}  # the handlers `record_signals` replaced


def record_signals() -> None:
    """SIGINT / SIGTERM recorded and raised as KeyboardInterrupt until `release_signals`. The console entry calls it
    first, before the seconds of importing jax, flax and torch, so a Ctrl-C during the imports is reported like any
    other (`interrupted()` sees it even if an import turned the KeyboardInterrupt into an ImportError or an XLA GC
    callback swallowed it)."""
    if threading.current_thread() is threading.main_thread() and not _before:
        _before.update({s: signal.signal(s, _on_signal) for s in EXIT_CODES})
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def release_signals() -> None:
    """Python's own handling back (a second Ctrl-C interrupts again); the commands that write folders install
    `signals_recorded` around their work. Then a signal recorded meanwhile is raised (`check_interrupted`)."""
    if _before:
        for s, handler in _before.items():
            signal.signal(s, handler)
        _before.clear()
        sys.unraisablehook = getattr(sys.unraisablehook, "wrapped", sys.unraisablehook)
    check_interrupted()


def interrupted() -> int | None:
    """The exit code of the first signal recorded (130 for SIGINT, 143 for SIGTERM), or None when none arrived."""
    return EXIT_CODES.get(_signals[0], 130) if _signals else None


@contextlib.contextmanager
def signals_recorded() -> Iterator[list[int]]:
    """SIGINT / SIGTERM recorded (and raised as KeyboardInterrupt) for the duration of the block. A signal recorded
    before it (by `record_signals`) is kept; the record is cleared on the way out, for the next command in this
    process."""
    if threading.current_thread() is not threading.main_thread():
        yield _signals
        return
    old = {s: signal.signal(s, _on_signal) for s in EXIT_CODES}
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(hook)
    try:
        yield _signals
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook
        _signals.clear()


def check_interrupted() -> None:
    """A safe point: raise KeyboardInterrupt when a signal arrived, even if its exception was swallowed."""
    if _signals:
        raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale(dst: Path) -> list[Path]:
    """Remove the `.DST.partial-PID-*` folders of processes that no longer run; returns them."""
    removed = []
    for p in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = p.name[len(f".{dst.name}.partial-") :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _rmtree(p)
            removed.append(p)
    return removed


def _rmtree(path: Path) -> None:
    """Remove a folder that a background writer (orbax's save threads) may still be filling for a moment."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


@contextlib.contextmanager
def staged_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to `dst`; on a clean exit it becomes `dst`, on any exception
    (KeyboardInterrupt included) it is removed and an existing `dst` is left untouched."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        for p in clean_stale(dst):
            print(f"removed {p}, left by an interrupted run", file=sys.stderr)
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise OSError(f"{dst}: cannot write the output in {dst.parent} ({e.strerror or e})") from None
    try:
        yield tmp
        check_interrupted()  # a swallowed Ctrl-C must not replace DST
        _commit(tmp, dst, overwrite)
    except BaseException:
        _rmtree(tmp)
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
    with signals_recorded() as received:
        try:
            result = write()
        except KeyboardInterrupt:
            result = None
            received.append(received[0] if received else signal.SIGINT)
        except (ValueError, OSError) as e:  # WeightsError is a ValueError: one clear message, no traceback
            if received:  # a signal became some other error on its way up: it is still an interruption
                result = None
            else:
                print(f"wurst-jax {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
                return 2
        if received and result is None:
            gc.collect()  # the interrupted work's debris goes now, while its `__del__` errors are kept quiet
            print(f"wurst-jax {command}: interrupted; {out} was not written or changed", file=sys.stderr)
            return EXIT_CODES.get(received[0], 130)
    print(result)
    return 0
