"""Dynamic batching for the server: requests of the same settings that arrive close together run as one batch.

`Engine` keeps one queue of image rows per `Settings` (size and sampling settings: one compiled shape each). A
single worker thread makes every model call (JAX is driven from one thread): it takes the settings whose oldest
row has waited longest, waits up to `max_wait_s` after that row's arrival for more rows of the same settings,
and runs up to `max_batch` of them as one batch, padded to exactly `max_batch` rows so each settings compiles
once. A request's `n` images may be spread over several batches; it completes when its last image is made.
No part of this file knows the model or HTTP: `generate(settings, rows) -> images` is all it calls.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from wurst_jax.serving.backend import Row, Settings


class QueueFull(RuntimeError):
    """Raised by `submit` when `max_queue` requests are already waiting (or the engine is stopping)."""


@dataclasses.dataclass(eq=False)
class _Request:
    settings: Settings
    rows: list[Row]
    done: Callable[[Any], None]  # called once, from the worker thread, with the images or an exception
    arrival: float
    images: list = dataclasses.field(default_factory=list)
    waiting: int = 0  # rows not yet taken into a batch
    left: int = 0  # rows not yet made
    failed: bool = False


class Engine:
    """The batcher and its worker thread; `metrics()` reports what it did."""

    def __init__(
        self,
        generate: Callable[[Settings, list[Row]], list],
        max_batch: int = 8,
        max_wait_s: float = 0.05,
        max_queue: int = 256,
    ):
        self._generate, self.max_batch, self.max_wait_s, self.max_queue = generate, max_batch, max_wait_s, max_queue
        self._cv = threading.Condition()
        self._pending: dict[Settings, collections.deque] = {}
        self._queued = 0  # requests with rows not yet taken
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._started = time.monotonic()
        self._latency: collections.deque = collections.deque(maxlen=1000)
        self._sizes: collections.Counter = collections.Counter()
        self._counts = collections.Counter()

    # ------------------------------------------------------------------ requests (any thread)

    def submit(self, settings: Settings, rows: list[Row], done: Callable[[Any], None]) -> None:
        """Queue one request; `done(images | exception)` is called from the worker thread when it completes."""
        if not rows:
            raise ValueError("a request needs at least one image")
        with self._cv:
            if self._stopping:
                self._counts["rejected"] += 1
                raise QueueFull("the server is shutting down")
            if self._queued >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(f"{self._queued} requests are already waiting (--max-queue {self.max_queue})")
            req = _Request(settings, list(rows), done, time.monotonic(), [None] * len(rows), len(rows), len(rows))
            q = self._pending.setdefault(settings, collections.deque())
            q.extend((req, k) for k in range(len(rows)))
            self._queued += 1
            self._cv.notify_all()

    async def generate(self, settings: Settings, rows: list[Row]) -> list:
        """`submit` from asyncio code: awaits the request's images (PIL, in row order)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result: Any) -> None:
            if fut.done():  # the client went away
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        def done(result: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, result)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                pass

        self.submit(settings, rows, done)
        return await fut

    def count(self, what: str) -> None:
        with self._cv:
            self._counts[what] += 1

    # ------------------------------------------------------------------ the worker

    def start(self, warmup: list[Settings] = ()) -> None:
        """Start the worker; it first runs one batch of each `warmup` settings (compiling them), then sets
        `ready` (or `error`, if a warm-up batch failed)."""
        # a daemon, so that a caller that forgets `stop` cannot keep the process alive; `stop` drains the queue
        self._thread = threading.Thread(target=self._loop, args=(list(warmup),), name="wurst-jax-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued one, then end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, warmup: list[Settings]) -> None:
        try:
            for settings in warmup:
                self._generate(settings, [Row("warm-up", None, 0)] * self.max_batch)
        except BaseException as e:  # reported by the caller waiting on `ready`
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        while (taken := self._take()) is not None:
            try:
                self._run(*taken)
            except BaseException as e:  # never leave a request waiting for a worker that is gone
                self._fail(taken[1], e)
                if not isinstance(e, Exception):
                    raise

    def _take(self) -> tuple[Settings, list] | None:
        with self._cv:
            while True:
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cv.wait()
                    continue
                settings = min(self._pending, key=lambda s: self._pending[s][0][0].arrival)
                q = self._pending[settings]
                left = q[0][0].arrival + self.max_wait_s - time.monotonic()
                if len(q) >= self.max_batch or left <= 0 or self._stopping:
                    break
                self._cv.wait(left)
            taken = [q.popleft() for _ in range(min(self.max_batch, len(q)))]
            if not q:
                del self._pending[settings]
            for req, _ in taken:
                req.waiting -= 1
                if req.waiting == 0:
                    self._queued -= 1
            return settings, taken

    def _run(self, settings: Settings, taken: list) -> None:
        rows = [req.rows[k] for req, k in taken]
        padded = rows + [rows[-1]] * (self.max_batch - len(rows))
        images = list(self._generate(settings, padded))[: len(rows)]
        if len(images) != len(rows):
            raise RuntimeError(f"the model returned {len(images)} images for {len(rows)} rows")
        now = time.monotonic()
        finished = []
        for (req, k), image in zip(taken, images, strict=True):
            req.images[k] = image
            req.left -= 1
            if req.left == 0 and not req.failed:
                finished.append(req)
        with self._cv:
            self._counts["batches"] += 1
            self._counts["images"] += len(rows)
            self._counts["requests"] += len(finished)
            self._sizes[len(rows)] += 1
            self._latency.extend(now - req.arrival for req in finished)
        for req in finished:
            req.done(req.images)

    def _fail(self, taken: list, error: BaseException) -> None:
        """Fail every request with a row in a batch that failed (each once); the server goes on."""
        for req in {id(r): r for r, _ in taken}.values():
            if not req.failed:
                req.failed = True
                req.done(error)
        with self._cv:
            self._counts["failed_batches"] += 1

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict:
        with self._cv:
            lat = np.asarray(self._latency, np.float64)
            batches = self._counts["batches"]
            return {
                "requests": self._counts["requests"],
                "images": self._counts["images"],
                "batches": batches,
                "batch_size_mean": self._counts["images"] / batches if batches else None,
                "batch_sizes": {str(k): v for k, v in sorted(self._sizes.items())},
                "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_s * 1000,
                "queue_length": self._queued,
                "rows_waiting": sum(len(q) for q in self._pending.values()),
                "rejected": self._counts["rejected"],
                "bad_requests": self._counts["bad_requests"],
                "failed_batches": self._counts["failed_batches"],
                "latency_s": {
                    "p50": float(np.percentile(lat, 50)) if lat.size else None,
                    "p95": float(np.percentile(lat, 95)) if lat.size else None,
                    "count": int(lat.size),
                },
                "uptime_s": time.monotonic() - self._started,
            }
