"""`wurst-jax serve`: an HTTP JSON API shaped like OpenAI's Images API, on Starlette + uvicorn (the `serve` extra).

- `POST /v1/images/generations`: `prompt`, `n` (1–10), `size` "WxH", `response_format` "b64_json" (the only one:
  images come back inline), `model` / `user` (accepted, ignored), plus `seed` (image k gets seed + k; without
  one a random seed, returned with each image), `negative_prompt`, `prior_steps`, `prior_guidance`, `steps`,
  `decoder_guidance`. Answer: `{"created": unix time, "data": [{"b64_json": PNG, "seed": s}, ...]}`.
- `GET /health`, `GET /metrics` (JSON: requests, images, batches, batch sizes, queue length, latency p50 / p95).
- Bad requests get 400 `{"error": {"message", "type": "invalid_request_error"}}`; a full queue 503 with
  `Retry-After`; a failed batch 500. Requests are batched by `engine.Engine`; the model runs in its one thread.
- SIGINT / SIGTERM: uvicorn stops accepting connections and waits for the open ones; every queued request is
  finished, then the worker ends and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from wurst_jax.serving.backend import ModelSpec, Row, Settings, StageLog
from wurst_jax.serving.engine import Engine, QueueFull
from wurst_jax.serving.jobs import MAX_SEED, Defaults, check_int, check_request

EXTRA_KEYS = ("seed", "negative_prompt", "prior_steps", "prior_guidance", "steps", "decoder_guidance")
API_KEYS = ("prompt", "n", "size", "response_format", "model", "user", *EXTRA_KEYS)
MAX_N = 10  # images per request, as OpenAI's API
_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")


def parse_size(text: Any, what: str = "size") -> tuple[int, int]:
    """ "WxH" → (height, width)."""
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"`{what}` must be 'WIDTHxHEIGHT' such as '1024x1024', got {text!r}")
    return int(m.group(2)), int(m.group(1))


def parse_generation(
    body: Any, defaults: Defaults, spec: ModelSpec, count_tokens: Callable[[str], int], max_tokens: int
) -> tuple[Settings, list[Row]]:
    """A request body → its settings and one row per image; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - set(API_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(API_KEYS)}")
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        why = "URLs are not served: images come back inline" if fmt == "url" else "unknown format"
        raise ValueError(f"`response_format` {fmt!r} is not supported ({why}); use 'b64_json'")
    n = check_int("n", 1 if body.get("n") is None else body["n"], 1, MAX_N)
    fields = {k: body[k] for k in EXTRA_KEYS if body.get(k) is not None}
    fields.update(prompt=body.get("prompt"), num_images=n)
    if body.get("size") not in (None, "auto"):
        fields["height"], fields["width"] = parse_size(body["size"])
    req = check_request(fields, defaults, spec, max_images=MAX_N)
    for key, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if text and (k := count_tokens(text)) > max_tokens:
            raise ValueError(f"`{key}` is {k} tokens long; the text encoder takes at most {max_tokens}")
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - n + 2)
    return req.settings, [Row(req.prompt, req.negative_prompt, seed + k) for k in range(n)]


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(engine: Engine, parse: Callable[[Any], tuple[Settings, list[Row]]], model: str = "") -> Any:
    """The Starlette app around a started `engine`; `parse(body)` checks a request. Its shutdown finishes every
    queued request and ends the engine's worker."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def generations(request: Any) -> Any:
        try:
            body = await request.json()
        except ValueError as e:
            engine.count("bad_requests")
            return _error(400, f"the body is not valid JSON ({e})", "invalid_request_error")
        try:
            settings, rows = parse(body)
        except ValueError as e:
            engine.count("bad_requests")
            return _error(400, str(e), "invalid_request_error")
        try:
            images = await engine.generate(settings, rows)
        except QueueFull as e:
            return _error(503, f"busy: {e}; retry later", "server_busy", headers={"Retry-After": "1"})
        except Exception as e:  # a failed batch: this request fails, the server goes on
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
        encoded = await asyncio.to_thread(lambda: [_png_b64(im) for im in images])
        data = [{"b64_json": b64, "seed": row.seed} for b64, row in zip(encoded, rows, strict=True)]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def health(request: Any) -> Any:
        return JSONResponse({"status": "ok", "model": model, "queue_length": engine.metrics()["queue_length"]})

    async def metrics(request: Any) -> Any:
        return JSONResponse(engine.metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        yield
        # A thread of its own: the default executor may already be shut down when the process is exiting.
        stopper = threading.Thread(target=engine.stop, name="wurst-jax-stop")
        stopper.start()
        while stopper.is_alive():
            await asyncio.sleep(0.05)

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP image API (OpenAI Images shape) with dynamic batching", description=__doc__)
    p.add_argument(
        "--model",
        help="decoder or combined folder, Würstchen v2 or Stable Cascade (its model_index.json picks the generation; "
        "default: the shipped tiny v2 model)",
    )
    p.add_argument("--prior", help="prior folder (omit with a combined folder)")
    p.add_argument("--variant", help="read the folders' variant weight files, e.g. bf16 (*.bf16.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=int, help="images per compiled batch (default 8, a multiple of the data axis)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="how long a request waits for others (ms)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 (default 256)")
    p.add_argument("--warmup", default="", help="sizes to compile at start-up, e.g. 1024x1024,1024x2048")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute and weight dtype")
    p.add_argument("--sharding", choices=("dp", "fsdp", "tp"), help="how to use several devices (default dp)")
    p.add_argument("--model-axis", type=int, default=1, help="size of the mesh's model axis (tp; default 1)")
    p.add_argument("--cache-dir", help="persistent compilation cache folder")
    p.add_argument("--quiet", action="store_true", help="no progress lines, uvicorn logs warnings only")


def _check_serve_args(args: argparse.Namespace, spec: ModelSpec) -> list[tuple[int, int]]:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0–65535, got {args.port}")
    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch must be ≥ 1, got {args.max_batch}")
    if args.max_queue < 1 or not 0 <= args.max_wait_ms <= 60_000:
        raise ValueError("--max-queue must be ≥ 1 and --max-wait-ms 0–60000")
    sizes = [parse_size(s.strip(), "--warmup") for s in args.warmup.split(",") if s.strip()]
    for h, w in sizes:
        try:
            spec.check_size(h, w)
        except ValueError as e:
            raise ValueError(f"--warmup {w}x{h}: {e}") from None
    return sizes


def run_serve(args: argparse.Namespace) -> int:
    """The serve command; ValueError / OSError mean bad input (the caller prints them, exit code 2)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("needs the serve extra: pip install 'wurst_jax[serve]' (starlette, uvicorn)") from None
    spec = ModelSpec.from_folders(args.model, args.prior, args.variant)
    sizes = _check_serve_args(args, spec)
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None

    import jax

    import wurst_jax as wj

    if args.cache_dir:
        wj.enable_compilation_cache(args.cache_dir)
    use_mesh = args.sharding or args.model_axis > 1 or jax.device_count() > 1
    mesh = wj.make_mesh(data=-1, model=args.model_axis) if use_mesh else None
    data = 1 if mesh is None else mesh.shape["data"]
    max_batch = args.max_batch or -(-8 // data) * data
    if max_batch % data:
        raise ValueError(f"--max-batch {max_batch} must be a multiple of the mesh's data axis ({data})")
    defaults = Defaults.for_model(spec)
    count_tokens, max_tokens = spec.token_counter()
    sharding = (args.sharding or "dp") if mesh is not None else None
    real = sys.stderr
    try:
        with contextlib.redirect_stderr(StageLog(lambda line: print(line, file=real, flush=True))):
            # the pipeline's compile lines are kept, its per-batch "ran in" lines dropped; uvicorn logs through it
            return _serve(args, spec, sizes, sock, mesh, sharding, max_batch, defaults, count_tokens, max_tokens)
    except KeyboardInterrupt:  # while loading or warming up, before uvicorn handles the signals
        print("wurst-jax serve: interrupted before serving", file=real)
        return 130


def _serve(
    args: argparse.Namespace,
    spec: ModelSpec,
    sizes: list[tuple[int, int]],
    sock: socket.socket,
    mesh: Any,
    sharding: str | None,
    max_batch: int,
    defaults: Defaults,
    count_tokens: Callable[[str], int],
    max_tokens: int,
) -> int:
    """Load, warm up, serve until a signal, drain."""
    import jax.numpy as jnp
    import uvicorn

    pipe = spec.load(dtype=getattr(jnp, args.dtype), mesh=mesh, sharding=sharding, progress=not args.quiet)
    engine = Engine(spec.generator(pipe), max_batch, args.max_wait_ms / 1000, args.max_queue)
    warm = [Settings(h, w, None, defaults.prior_guidance, defaults.steps, defaults.decoder_guidance) for h, w in sizes]
    engine.start(warm)
    engine.ready.wait()
    if engine.error is not None:
        raise engine.error
    parse = lambda body: parse_generation(body, defaults, spec, count_tokens, max_tokens)
    app = create_app(engine, parse, spec.decoder.name)
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", timeout_graceful_shutdown=None)
    host, port = sock.getsockname()[:2]
    print(f"wurst-jax serve: listening on http://{host}:{port} (max batch {max_batch})", file=sys.stderr, flush=True)
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # uvicorn handles the signals itself and raises them again once it has shut down: `caught` records that
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    m = engine.metrics()
    print(
        f"wurst-jax serve: stopped; {m['requests']} requests, {m['images']} images in {m['batches']} batches",
        file=sys.stderr,
    )
    return 0
