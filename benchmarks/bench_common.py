"""Helpers shared by the benchmark scripts: package versions, UTC timestamps, appending to RESULTS.md."""

from __future__ import annotations

import datetime
import sys
from importlib import metadata
from pathlib import Path


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_results_md(out_dir: str | Path, text: str) -> None:
    """Append a section to `<out_dir>/RESULTS.md`, creating the file with a title if needed."""
    md = Path(out_dir) / "RESULTS.md"
    md.parent.mkdir(parents=True, exist_ok=True)
    title = "" if md.is_file() else "# Benchmark results\n\nSections appended by the scripts in `benchmarks/`.\n"
    with md.open("a") as f:
        f.write(title + "\n" + text)
