"""Many images: `wurst-jax generate --prompts` and `wurst-jax serve` against one pipeline call per prompt.

Usage (repo root):  python benchmarks/serve_benchmark.py [--num-prompts 256] [--batch-size 8] [--concurrency 8 32 64]
On the shipped tiny model (64², its default settings: 29 prior steps + 12 decoder steps, both with guidance):
1. one `pipe(prompt, seed=...)` call per prompt in this process, after a warm-up call (img/s, per-call p50 / p95);
2. the real `wurst-jax generate --prompts FILE --out-dir DIR --batch-size B` in a child process over the same
   prompts (its own summary: images, loop seconds, compile seconds; img/s without compiling; the whole command's
   wall time with start-up and loading);
3. the real `wurst-jax serve --warmup 64x64` in a child process, under C closed-loop clients (each sends its next
   request when the last is answered) for C in --concurrency: throughput, client-side latency p50 / p95, and the
   mean batch size from /metrics.
Figures are appended to `<out-dir>/RESULTS.md` and `<out-dir>/results.jsonl`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = ("blue", "black", "white", "grey", "green", "red", "yellow", "purple")


def prompts(n: int) -> list[str]:
    every = [f"a {c} {s} on a {b} background" for b in BACKGROUNDS for s in SHAPES for c in COLOURS if c != b]
    return [every[i % len(every)] for i in range(n)]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def per_prompt(a, texts: list[str]) -> dict:
    """One pipeline call per prompt in this process (the first call compiles and is not counted)."""
    import jax.numpy as jnp

    from wurst_jax.serving import ModelSpec

    spec = ModelSpec.from_folders()
    pipe = spec.load(dtype=getattr(jnp, a.dtype), progress=False)
    kw = dict(height=spec.default_size, width=spec.default_size, decoder_guidance_scale=spec.default_decoder_guidance)
    kw.update(spec.prior_defaults)
    t0 = time.perf_counter()
    pipe(texts[0], seed=0, **kw)
    compile_s = time.perf_counter() - t0
    calls = []
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        pipe(text, seed=i, **kw)
        calls.append(time.perf_counter() - t0)
    total = sum(calls)
    return dict(
        mode="one pipe call per prompt",
        images=len(texts),
        clients=None,
        img_per_s=len(texts) / total,
        p50_s=float(np.percentile(calls, 50)),
        p95_s=float(np.percentile(calls, 95)),
        mean_batch=1.0,
        seconds=total,
        compile_s=compile_s,
        wall_s=None,
    )


def batch_command(a, texts: list[str], tmp: Path, batch_size: int) -> dict:
    """The real command in a child process; its summary line gives the loop and compile seconds."""
    file = tmp / "prompts.txt"
    file.write_text("\n".join(texts) + "\n")
    out = tmp / f"out-{batch_size}"
    cmd = [sys.executable, "-m", "wurst_jax.cli", "generate", "--prompts", str(file), "--out-dir", str(out)]
    cmd += ["--batch-size", str(batch_size), "--dtype", a.dtype]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"generate --prompts failed:\n{p.stderr[-3000:]}")
    m = re.search(r"(\d+) images in ([0-9.]+) s \([0-9.]+ img/s; ([0-9.]+) s compiling\)", p.stderr)
    images, loop_s, compile_s = int(m.group(1)), float(m.group(2)), float(m.group(3))  # loop: all batches
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # steady state: every batch but the first (which compiles and makes the first call's other one-time work)
    chunks = [recs[i : i + batch_size] for i in range(batch_size, len(recs), batch_size)]
    batch_s = [c[0]["batch_seconds"] for c in chunks]
    steady = sum(len(c) for c in chunks) / sum(batch_s) if batch_s else None
    return dict(
        mode=f"generate --prompts, batch {batch_size}",
        images=images,
        clients=None,
        img_per_s=steady,
        p50_s=float(np.percentile(batch_s, 50)) if batch_s else None,
        p95_s=float(np.percentile(batch_s, 95)) if batch_s else None,
        mean_batch=float(batch_size),
        seconds=loop_s,
        compile_s=compile_s,
        first_batch_s=recs[0]["batch_seconds"],
        wall_s=wall,
    )


def serve(a, texts: list[str]) -> list[dict]:
    import httpx

    cmd = [sys.executable, "-m", "wurst_jax.cli", "serve", "--port", "0", "--warmup", "64x64", "--quiet"]
    cmd += ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--dtype", a.dtype]
    cmd += ["--max-queue", str(max(a.concurrency) * 2)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=child_env(), stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stderr], daemon=True).start()
    line = ""
    while "listening on" not in line:
        line = lines.get(timeout=600)
    start_s = time.perf_counter() - t0
    url = line.split("listening on ")[1].split()[0]
    rows = []
    try:
        for c in a.concurrency:
            n = max(a.requests, 2 * c)
            before = httpx.get(url + "/metrics").json()

            def ask(i: int) -> float:
                t = time.perf_counter()
                r = httpx.post(
                    url + "/v1/images/generations", json={"prompt": texts[i % len(texts)], "seed": i}, timeout=600
                )
                r.raise_for_status()
                return time.perf_counter() - t

            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = list(pool.map(ask, range(n)))
            wall = time.perf_counter() - t0
            after = httpx.get(url + "/metrics").json()
            batches = after["batches"] - before["batches"]
            rows.append(
                dict(
                    mode=f"serve, max batch {a.max_batch}, wait {a.max_wait_ms:g} ms",
                    images=n,
                    clients=c,
                    img_per_s=n / wall,
                    p50_s=float(np.percentile(lat, 50)),
                    p95_s=float(np.percentile(lat, 95)),
                    mean_batch=(after["images"] - before["images"]) / batches,
                    seconds=wall,
                    compile_s=None,
                    wall_s=start_s,
                )
            )
            print(f"  {c} clients: {rows[-1]['img_per_s']:.2f} img/s", file=sys.stderr)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(300)
    return rows


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "starlette", "uvicorn", "httpx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _f(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def report(a, rows: list[dict], device: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"## Batch generation and serving · {date} · {device} · shipped tiny model, 64², {a.dtype}", ""]
    lines += [" · ".join(f"{k} {v}" for k, v in versions().items()) + f" · {os.cpu_count()} host CPUs", ""]
    lines += [
        f"Command: `python benchmarks/serve_benchmark.py {shlex.join(sys.argv[1:])}`"
        + (f" ({a.label})" if a.label else ""),
        "",
    ]
    lines += ["| mode | images | clients | img/s | p50 s | p95 s | mean batch | compile s | start-up s |"]
    lines += ["|---" * 9 + "|"]
    for r in rows:
        clients = "–" if r["clients"] is None else str(r["clients"])
        lines.append(
            f"| {r['mode']} | {r['images']} | {clients} | {_f(r['img_per_s'])} | {_f(r['p50_s'], '.3f')} | "
            f"{_f(r['p95_s'], '.3f')} | {r['mean_batch']:.2f} | {_f(r['compile_s'], '.1f')} | "
            f"{_f(r['wall_s'], '.1f')} |"
        )
    lines += [
        "",
        "- Settings: the tiny model's defaults (29 prior steps with guidance 4, 12 decoder steps with guidance 4), "
        "one image per prompt, a seed per image.",
        "- img/s: images over the seconds spent making them, once compiled: the per-prompt loop after its warm-up "
        "call, `generate`'s batches after its first (compile s: what its per-stage compile lines add up to; the "
        "first batch also pays for other one-time work), the server after its start-up --warmup.",
        "- p50 / p95: per call (one pipe call per prompt), per batch (generate; the first, compiling batch left "
        "out), per request as the client sees it (serve: queueing and HTTP included).",
        "- start-up s: generate: the whole command (Python start, loading, compiling, all batches); serve: from "
        "spawning the server to its `listening` line (loading + the warm-up compile).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8], help="generate --prompts batch sizes")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64], help="concurrent clients")
    ap.add_argument("--requests", type=int, default=128, help="requests per concurrency level (at least 2 × C)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=50.0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--skip-per-prompt", action="store_true", help="leave out the one-call-per-prompt loop")
    ap.add_argument("--skip-batch", action="store_true", help="leave out generate --prompts")
    ap.add_argument("--label", default="", help="a note for the RESULTS.md heading")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    a = ap.parse_args()
    import jax

    device = jax.devices()[0].platform
    texts = prompts(a.num_prompts)
    rows = []
    if not a.skip_per_prompt:
        print("one pipe call per prompt …", file=sys.stderr)
        rows.append(per_prompt(a, texts))
    with tempfile.TemporaryDirectory() as tmp:
        for b in [] if a.skip_batch else a.batch_size:
            print(f"generate --prompts, batch {b} …", file=sys.stderr)
            rows.append(batch_command(a, texts, Path(tmp), b))
    print("serve …", file=sys.stderr)
    rows += serve(a, texts)
    text = report(a, rows, device)
    print(text)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "RESULTS.md", "a") as f:
        f.write("\n" + text)
    date, vers = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), versions()
    with open(out / "results.jsonl", "a") as f:
        for r in rows:
            rec = {
                "implementation": "wurst_jax",
                "benchmark": "serve",
                "device": device,
                "model": "tiny",
                "resolution": 64,
                "dtype": a.dtype,
                **r,
                "date": date,
                "versions": vers,
                "command": shlex.join(sys.argv[1:]),
            }
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
