"""Conversion time and peak memory, and orbax restore vs converting again, on full-size random checkpoints.

Usage: python benchmarks/convert_benchmark.py [--components prior,decoder] [--workdir /tmp/wurst_convert_bench]
                                              [--dtype float32] [--repeat 2] [--results benchmarks/RESULTS.md]

1. Writes full-size random-weight f32 checkpoints with diffusers `save_pretrained` (once; reused on later runs).
2. Converts each with `wurst_jax.convert_checkpoint` in a fresh process and records its wall time and
   peak RSS (the child's own `ru_maxrss`, so building the checkpoints does not count).
3. Loads each component in fresh processes: from the diffusers folder (`load_component` converting from
   safetensors) and from the converted folder (orbax restore); best of `--repeat`, page cache warm for both.
Targets: peak RSS ≤ 1.5 × the checkpoint file; orbax restore ≥ 3× faster than converting from safetensors.
Every step is its own process, so one model is in memory at a time. Prints a table and appends it to `--results`
under a "Conversion" heading.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

BUILD = """
import dataclasses, sys, torch
import wurst_jax as wj
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior
name, folder = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
models = {"prior": (WuerstchenPrior, wj.StageCConfig.v2()), "decoder": (WuerstchenDiffNeXt, wj.StageBConfig.v2())}
cls, cfg = models[name]
kw = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
cls(**kw).eval().save_pretrained(folder, max_shard_size="100GB")
"""

CONVERT = """
import json, resource, sys, time
from wurst_jax import convert_checkpoint
t0 = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], overwrite=True)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

LOAD = """
import json, resource, sys, time
import jax, jax.numpy as jnp
import wurst_jax as wj
jax.block_until_ready(jnp.zeros(1))  # backend start-up is not part of loading
times = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    _, variables = wj.load_component(sys.argv[1], dtype=getattr(jnp, sys.argv[2]))
    jax.block_until_ready(variables)
    times.append(time.perf_counter() - t0)
    del variables
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": min(times), "all": times, "peak_rss": peak, "device": str(jax.devices()[0])}))
"""


def child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python; its last stdout line is a JSON dict."""
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> str:
    import importlib.metadata as md

    names = ("wurst_jax", "jax", "flax", "orbax-checkpoint", "numpy", "safetensors")
    return ", ".join(f"{n} {md.version(n)}" for n in names)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def run(args: argparse.Namespace) -> str:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    device = "?"
    for name in args.components:
        src = work / name
        weights = src / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            print(f"building full-size random {name} in {src} …", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-c", BUILD, name, str(src)], check=True)
        size = weights.stat().st_size
        dst = work / f"{name}-converted"
        print(f"converting {name} ({size / 1e9:.2f} GB) …", file=sys.stderr, flush=True)
        conv = child(CONVERT, str(src), str(dst), args.dtype)
        print(f"loading {name}: safetensors, orbax …", file=sys.stderr, flush=True)
        from_st = child(LOAD, str(src), args.dtype, str(args.repeat))
        from_ox = child(LOAD, str(dst), args.dtype, str(args.repeat))
        device = from_ox["device"]
        rows.append(
            f"| {name} | {size / 1e9:.2f} | {conv['seconds']:.1f} | {conv['peak_rss'] / 1e9:.2f} "
            f"| {conv['peak_rss'] / size:.2f} | {from_st['seconds']:.1f} | {from_ox['seconds']:.2f} "
            f"| {from_st['seconds'] / from_ox['seconds']:.1f}× | {conv['seconds'] / from_ox['seconds']:.1f}× "
            f"| {from_ox['peak_rss'] / 1e9:.2f} |"
        )
        if not args.keep:
            subprocess.run(["rm", "-rf", str(dst)], check=True)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = textwrap.dedent(f"""\
        ### {date} — {device} ({machine()}), dtype {args.dtype}
        {versions()}. `python benchmarks/convert_benchmark.py --components {",".join(args.components)}`;
        checkpoint = the diffusers f32 safetensors file; RSS = the converting process's peak (`ru_maxrss`);
        load/restore = `load_component` in a fresh process (best of {args.repeat}, page cache warm).
        Targets: RSS/file ≤ 1.5, restore ≥ 3× faster than converting.

        """)
    columns = (
        "component, file GB, convert s, convert peak RSS GB, RSS / file, load from safetensors s, orbax restore s, "
        "restore speed-up vs safetensors load, vs convert, restore peak RSS GB"
    ).split(", ")
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows]
    return header + "\n".join(table) + "\n"


def append_results(path: Path, table: str) -> None:
    """Append under the "## Conversion" heading (created at the end if missing), before the next "## " heading."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if "## Conversion" not in lines:
        lines += ["", "## Conversion"]
    start = lines.index("## Conversion")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    lines[end:end] = ["", *table.rstrip("\n").split("\n")]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--components", type=lambda s: s.split(","), default=["prior", "decoder"])
    p.add_argument("--workdir", default="/tmp/wurst_convert_bench")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the converted folders")
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = p.parse_args()
    table = run(args)
    print(table)
    append_results(Path(args.results), table)


if __name__ == "__main__":
    main()
