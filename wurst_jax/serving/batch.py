"""`wurst-jax generate --prompts FILE --out-dir DIR`: every prompt of a file, in fixed-size batches over all devices
of all hosts, resumable.

- The file is checked whole before any weights load (`jobs.parse_prompt_file`). Images are grouped by size and
  settings so each group compiles once; every batch has `--batch-size` rows (the last of a group padded by
  repeating a real row), split over the mesh's data axis.
- Output: one PNG per image, written under a temporary name in DIR and renamed into place, then its line in
  `DIR/results.jsonl` (flushed and fsync'd), so a listed image is always complete. A rerun of the same command
  skips every listed image whose PNG is present: a crash, SIGKILL or power loss costs at most the batch in flight.
- SIGTERM (TPU preemption) and SIGINT: the batch in flight is finished and written, then the command exits
  (143 / 130) saying to rerun it. A second Ctrl-C stops at once (exit 130).
- Multi-host: every process reads the same FILE and computes the same plan; process 0 alone reads and writes DIR
  (it tells the others which images are done), so DIR need not be on a shared filesystem. The pipeline gathers
  each batch's images to every process; the decision to stop is agreed between batches (SIGTERM through JAX's
  preemption sync point, which JAX's own notifier catches under `jax.distributed`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wurst_jax.serving.backend import ModelSpec, Settings, StageLog
from wurst_jax.serving.jobs import (
    RESULTS,
    Defaults,
    ImageJob,
    check_request,
    done_mask,
    load_results,
    padded_rows,
    parse_prompt_file,
    plan_batches,
)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """`generate`'s batch options; with --prompts every other option becomes a default for the file's lines."""
    p.add_argument(
        "--prompts",
        help="prompt file: .txt (one prompt per line) or .jsonl (prompt, negative_prompt, seed, height, width, "
        "num_images, id, prior_steps, prior_guidance, steps, decoder_guidance); needs --out-dir",
    )
    p.add_argument("--out-dir", help="with --prompts: folder for the PNGs and results.jsonl (rerun to resume)")
    p.add_argument(
        "--batch-size", type=int, help="with --prompts: images per compiled batch (default: the mesh's data axis)"
    )


class StopFlag:
    """SIGINT / SIGTERM handler: remembers the first signal so the run stops between batches; a second Ctrl-C
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        name = signal.Signals(signum).name
        print(f"wurst-jax generate: {name}: finishing the batch in flight (Ctrl-C again stops now)", file=sys.stderr)

    def install(self) -> None:
        self._old = {s: signal.signal(s, self) for s in EXIT_CODES}

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class Summary:
    images: int  # made by this run
    skipped: int  # already in the folder
    seconds: float
    compile_seconds: float
    stopped: bool = False


def write_png(out_dir: Path, name: str, image: Any) -> None:
    """Atomic: a temporary file in the same folder, fsync'd, renamed into place."""
    tmp = out_dir / f".{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def run_plan(
    generate: Callable[[Settings, list], list],
    jobs: list[ImageJob],
    out_dir: Path,
    batch_size: int,
    made_with: dict,
    *,
    writer: bool = True,
    show: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    skipped: int = 0,
) -> Summary:
    """Make `jobs` (those not done yet) batch by batch with `generate(settings, rows) -> images`; `writer`
    writes the PNGs and results.jsonl lines (with `made_with`: model provenance and dtype)."""
    from tqdm import tqdm

    batches = plan_batches(jobs, batch_size)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    real = sys.stderr
    lines = StageLog(lambda line: tqdm.write(line, file=real))
    bar = tqdm(total=len(jobs) + skipped, initial=skipped, unit="img", file=real, disable=not show, smoothing=0.1)
    made, stopped, seen = 0, False, set()
    t_start = time.perf_counter()
    with contextlib.redirect_stderr(lines) if show else contextlib.nullcontext():
        for settings, batch in batches:
            if should_stop():
                stopped = True
                break
            if settings not in seen and show:
                seen.add(settings)
                n = sum(len(b) for s, b in batches if s == settings)
                tqdm.write(f"[wurst_jax] group {len(seen)}: {settings.label()}: {n} image(s)", file=real)
            t0 = time.perf_counter()
            images = generate(settings, padded_rows(batch, batch_size))[: len(batch)]
            dt = time.perf_counter() - t0
            if writer:
                for job, image in zip(batch, images, strict=True):
                    write_png(out_dir, job.file, image)
                _fsync_dir(out_dir)  # the PNGs' names are durable before results.jsonl lists them
                extra = {"seconds": round(dt / len(batch), 4), "batch_seconds": round(dt, 4), "batch_size": batch_size}
                _append(out_dir / RESULTS, [{**job.record(), **made_with, **extra} for job in batch])
            made += len(batch)
            bar.update(len(batch))
    bar.close()
    return Summary(made, skipped, time.perf_counter() - t_start, lines.compile_seconds, stopped)


def _lock(out_dir: Path) -> Any:
    """An exclusive lock on DIR/.lock for the run (two commands never append to one results.jsonl); released by
    the kernel when the process ends, however it ends. Filesystems without flock run unlocked."""
    f = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise OSError(f"{out_dir}: another wurst-jax generate is writing this folder") from None
    except OSError:
        pass
    return f


def _prepare_out_dir(out_dir: Path, jobs: list[ImageJob], made_with: dict, writer: bool) -> tuple[list[bool], Any]:
    """Process 0 locks DIR, removes temporary files a killed run left, and reads which images are done; the
    other processes learn the same from it."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    mask, lock, error = [False] * len(jobs), None, None
    if writer:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = _lock(out_dir)
            for tmp in out_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            mask = done_mask(jobs, load_results(out_dir), made_with)
        except (ValueError, OSError) as e:
            error = e
    if jax.process_count() > 1:
        arr = np.asarray(multihost_utils.broadcast_one_to_all(np.array([error is not None, *mask], np.int32)))
        if arr[0] and error is None:
            error = ValueError("process 0 could not use the output folder (its message says why)")
        mask = [bool(x) for x in arr[1:]]
    if error is not None:
        raise error
    return mask, lock


def _agreed(flag: StopFlag) -> Callable[[], bool]:
    """Stop between batches when any process got a signal; all processes stop before the same batch.

    Under `jax.distributed` JAX's preemption notifier takes SIGTERM (the TPU preemption notice) itself, so a
    SIGTERM shows as `reached_preemption_sync_point`, which every process reaches at the same batch; SIGINT comes
    to `flag`, which the processes share with an all-gather."""
    import itertools

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    batch = itertools.count()

    def should_stop() -> bool:
        try:
            preempted = multihost_utils.reached_preemption_sync_point(next(batch))
        except RuntimeError:  # the preemption service is turned off
            preempted = False
        if jax.process_count() == 1:
            return preempted or flag.signum is not None
        signalled = np.asarray(multihost_utils.process_allgather(np.int32(flag.signum is not None))).any()
        return preempted or bool(signalled)

    return should_stop


def run_batch(args: argparse.Namespace) -> int:
    """The batch command; ValueError / OSError mean bad input (the caller prints them, exit code 2)."""
    flag = StopFlag()
    flag.install()
    try:
        return _run(args, flag)
    except KeyboardInterrupt:
        print(
            "wurst-jax generate: interrupted; the images listed in results.jsonl are complete: rerun the same "
            "command to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        flag.restore()


def _defaults(args: argparse.Namespace, spec: ModelSpec) -> Defaults:
    d = Defaults(
        height=args.height or spec.default_size,
        width=args.width or spec.default_size,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        num_images=args.num_images,
        prior_steps=args.prior_steps,
        prior_guidance=args.prior_guidance,
        steps=spec.default_steps if args.steps is None else args.steps,
        decoder_guidance=spec.default_decoder_guidance if args.decoder_guidance is None else args.decoder_guidance,
    )
    try:
        check_request({"prompt": "-", "seed": d.seed}, d, spec)
    except ValueError as e:
        raise ValueError(f"the command's options (defaults for the prompt file): {e}") from None
    return d


def _run(args: argparse.Namespace, flag: StopFlag) -> int:
    if args.prompt is not None or not args.prompts or not args.out_dir:
        raise ValueError("batch mode takes --prompts FILE and --out-dir DIR, and no PROMPT")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    spec = ModelSpec.from_folders(args.model, args.prior, getattr(args, "variant", None))
    jobs = parse_prompt_file(args.prompts, _defaults(args, spec), spec)  # every line checked before any loading

    import jax
    import jax.numpy as jnp

    import wurst_jax as wj

    t_start = time.perf_counter()
    if args.distributed or args.coordinator:
        wj.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from wurst_jax.pipelines.runtime import use_compilation_cache

    use_compilation_cache(args.cache_dir, enabled=not getattr(args, "no_cache", False))
    use_mesh = args.sharding or args.model_axis > 1 or jax.device_count() > 1
    mesh = wj.make_mesh(data=-1, model=args.model_axis) if use_mesh else None
    data = 1 if mesh is None else mesh.shape["data"]
    batch_size = args.batch_size or data
    if batch_size % data:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the mesh's data axis ({data})")
    writer = jax.process_index() == 0
    out_dir = Path(args.out_dir)
    made_with = {"model": spec.provenance(), "dtype": args.dtype}
    if spec.variant is not None:  # other weight files: images of another variant are not resumed as done
        made_with["variant"] = spec.variant
    mask, lock = _prepare_out_dir(out_dir, jobs, made_with, writer)
    todo = [j for j, done in zip(jobs, mask, strict=True) if not done]
    show = not args.quiet and writer
    summary = Summary(0, len(jobs) - len(todo), 0.0, 0.0)
    try:
        if todo and (flag.signum is None or jax.process_count() > 1):  # several: they stop together, in run_plan
            pipe = spec.load(
                dtype=getattr(jnp, args.dtype),
                mesh=mesh,
                sharding=(args.sharding or "dp") if mesh is not None else None,
                offload=args.offload,
                progress=show,
            )
            summary = run_plan(
                spec.generator(pipe),
                todo,
                out_dir,
                batch_size,
                made_with,
                writer=writer,
                show=show,
                should_stop=_agreed(flag),
                skipped=len(jobs) - len(todo),
            )
    finally:
        if lock is not None:
            lock.close()
    done = summary.images + summary.skipped
    if flag.signum is not None or summary.stopped:
        name = signal.Signals(flag.signum or signal.SIGTERM).name
        print(
            f"wurst-jax generate: stopped by {name} after finishing the batch in flight: {done} of {len(jobs)} "
            f"images are in {out_dir}; rerun the same command to continue",
            file=sys.stderr,
        )
        return EXIT_CODES.get(flag.signum or signal.SIGTERM, 143)
    if show and not todo:
        print(f"wurst-jax generate: nothing to do: all {len(jobs)} images are in {out_dir}", file=sys.stderr)
    elif show:
        wall, rate = summary.seconds, summary.images / summary.seconds if summary.seconds else 0.0
        print(
            f"wurst-jax generate: {summary.images} images in {wall:.1f} s ({rate:.2f} img/s; "
            f"{summary.compile_seconds:.1f} s compiling), {summary.skipped} already there; "
            f"{time.perf_counter() - t_start:.1f} s in all with loading",
            file=sys.stderr,
        )
    if writer:
        print(out_dir / RESULTS)
    return 0
