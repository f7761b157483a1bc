"""Start-up benchmark: wall time of `import wurst_jax` and of `wurst-jax generate` with the shipped tiny model.

Usage (repo root):  python benchmarks/startup_benchmark.py [--runs 5] [--root CHECKOUT] [--label before]
Each figure is the median of `--runs` fresh processes (all runs are recorded too):
- `import_s`: `python -c "import wurst_jax"`.
- `generate_first_s`: `wurst-jax generate "a red circle on a blue background"` on an empty compilation cache (a new
  `--cache-dir` folder per run: everything compiled).
- `generate_later_s`: the same command on a cache an earlier (untimed) run filled: what a user's second command costs.
`--root` measures another checkout (e.g. the main branch before a change) through PYTHONPATH. The rows are appended
to `<out-dir>/results.jsonl` and a table to `<out-dir>/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = "a red circle on a blue background"


def timed(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(root: Path, runs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("XLA_FLAGS", None)
    env.pop("WURST_JAX_CACHE_DIR", None)
    with tempfile.TemporaryDirectory(prefix="wurst_jax_startup_") as tmp:
        gen = [sys.executable, "-m", "wurst_jax.cli", "generate", PROMPT, "--out", f"{tmp}/image.png", "--quiet"]
        out = {"import_s": [timed([sys.executable, "-c", "import wurst_jax"], env, tmp) for _ in range(runs)]}
        out["generate_first_s"] = [timed([*gen, "--cache-dir", f"{tmp}/cold{i}"], env, tmp) for i in range(runs)]
        timed([*gen, "--cache-dir", f"{tmp}/warm"], env, tmp)  # fills the cache: not timed
        out["generate_later_s"] = [timed([*gen, "--cache-dir", f"{tmp}/warm"], env, tmp) for _ in range(runs)]
    return out


def main(argv=None):
    import generate_benchmark as gb

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--root", default=str(ROOT), help="the checkout to measure (default: this one)")
    ap.add_argument("--label", default="", help="a note for the row and the table (e.g. before / after)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    a = ap.parse_args(argv)
    runs = measure(Path(a.root).resolve(), a.runs)
    row = dict(benchmark="startup", date=gb.utc_now(), device="cpu", cpus=os.cpu_count(), versions=gb.versions())
    row.update(root=str(Path(a.root).resolve()), label=a.label or None, runs=runs)
    row.update({k: statistics.median(v) for k, v in runs.items()} | {"median_of": a.runs})
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    lines = [
        f"## Start-up · {row['date']} · CPU ({os.cpu_count()} cores){' · ' + a.label if a.label else ''}",
        "",
        f"`python benchmarks/startup_benchmark.py --runs {a.runs}` on {row['root']}; median of {a.runs} fresh "
        "processes (all runs in results.jsonl); jax " + str(row["versions"]["jax"]),
        "",
        "| figure | median s | runs s |",
        "|---|---|---|",
    ]
    for k, v in runs.items():
        lines.append(f"| {k} | {row[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    gb.append_results_md(out, text)


if __name__ == "__main__":
    main()
