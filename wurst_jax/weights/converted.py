"""Converted folders: PyTorch checkpoints → folders of orbax checkpoints that load without PyTorch or conversion
(`wurst-jax convert SRC DST`, `wj.convert_checkpoint`).

SRC is a diffusers pipeline folder (`warp-ai/wuerstchen`, `warp-ai/wuerstchen-prior`, or a combined one with
`prior_*` parts), one component folder (config.json + safetensors), an original Würstchen `.pt` checkpoint (read
with `torch.load(weights_only=True)`: a pickle holding anything but tensors is refused) or a single original-layout
`.safetensors` file; the last two have no config.json, so `stage` names the component and the official v2 config
is used unless `config` is given. Stable Cascade's original files (Stability-AI/StableCascade) convert the same way:
`stage="stage_c"` / `"stage_b"` (full or lite, f32 or bf16, read off the tensor shapes), `"stage_a"`,
`"effnet_encoder"`. `variant="bf16"` reads diffusers' variant weight files of folders
(`diffusion_pytorch_model.bf16.safetensors`, `model.bf16.safetensors`, sharded `*.safetensors.index.bf16.json`).
For `stage="effnet"` (the EfficientNet semantic encoder) the variant and the mapper's BatchNorm are read off the
tensor names: Würstchen v2's `model_v2_stage_b.pt` keeps it under
`effnet_state_dict`, Stable Cascade's `effnet_encoder.safetensors` holds it alone.

DST mirrors SRC: each component folder becomes `config.json` + `orbax/` (the variables, saved with orbax),
everything else (tokenizer/, scheduler/, model_index.json) is copied, and `wurst_jax_manifest.json` records the
source files' sha256, the dtype and the versions used. `load_component` and `WuerstchenPipeline.from_pretrained`
load DST exactly as they load SRC.

The output is written into a temporary folder next to DST and renamed into place only when complete; on any
failure, KeyboardInterrupt included, the temporary folder is removed and an existing DST is left untouched.
Components are converted one at a time, tensors one at a time; a NaN or Inf weight is refused (or, with
`nonfinite="warn"`, reported).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from wurst_jax.dtypes import DTYPES, dtype_name, is_float
from wurst_jax.output_dir import check_destination, staged_folder
from wurst_jax.sharding import ShardingPlan
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.export import component_config
from wurst_jax.weights.load import module_from_source
from wurst_jax.weights.mapping import TensorRef
from wurst_jax.weights.orbax_io import ORBAX_DIR, save_variables
from wurst_jax.weights.sources import Source, open_file, open_folder

MANIFEST = "wurst_jax_manifest.json"


# ---------------------------------------------------------------------------------------------------------------
# public API


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: Any = "float32",
    components: Sequence[str] | None = None,
    overwrite: bool = False,
    nonfinite: str = "error",
    stage: str | None = None,
    config: Any = None,
    progress: bool = False,
    variant: str | None = None,
) -> Path:
    """Convert `src` (see the module docstring) into the converted folder `dst`; returns `dst`.

    `dtype`: "float32" or "bfloat16" (the stored parameter dtype; BatchNorm statistics stay f32).
    `components`: the component folders of a pipeline to convert (e.g. ["prior", "text_encoder"]); the others
    are copied unchanged, so DST still loads as a whole pipeline. `overwrite`: replace an existing DST (only once
    the new one is complete). `nonfinite`: "error" refuses NaN / Inf weights, "warn" converts them with a
    warning. `stage` (see `registry.single_file_stages()`: "prior", "decoder", "vqgan", "effnet", "stage_c",
    "stage_b", ...) and `config` (a dict, a config.json path or a JSON string) are for single-file sources;
    `variant` ("bf16") for folders.
    """
    src, dst = Path(src), Path(dst)
    name = dtype_name(dtype)
    if nonfinite not in ("error", "warn"):
        raise ValueError(f"nonfinite must be 'error' or 'warn', got {nonfinite!r}")
    check_destination(src, dst, overwrite)
    source_format, jobs, copies = _plan(src, components, stage, config, variant)
    say = _say if progress else lambda _: None
    with staged_folder(dst, overwrite) as tmp:
        report = {}
        for folder, source in jobs:
            t0 = time.perf_counter()
            what = folder or source.spec.kind
            report[what] = _convert(source, tmp / folder, DTYPES[name], nonfinite)
            say(f"{what}: {len(source.tensors)} tensors → {name} in {time.perf_counter() - t0:.1f} s")
        for path in copies:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        manifest = _manifest(src, source_format, name, [s for _, s in jobs], copies, report)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {dst}")
    return dst


# ---------------------------------------------------------------------------------------------------------------
# what to convert

Job = tuple[str, Source]  # (the folder under DST, "" when DST is the component folder itself; the opened source)


def _plan(
    src: Path, components: Sequence[str] | None, stage: str | None, config: Any, variant: str | None = None
) -> tuple[str, list[Job], list]:
    """(source format, jobs, paths to copy); every config and safetensors header is read and checked here."""
    if components is not None:
        components = [c.strip() for c in ([components] if isinstance(components, str) else components) if c.strip()]
    if src.is_dir():
        if stage is not None or config is not None:
            raise ValueError(f"{src}: --stage / --config are for single checkpoint files; a folder has config.json")
        if (src / "config.json").is_file():
            source = open_folder(src, variant)
            if components and set(components) != {source.spec.kind}:
                raise WeightsError(
                    f"{src}: a single {source.spec.kind} component folder; --components {components} do not fit"
                )
            return "diffusers-component", [("", source)], []
        return ("diffusers-pipeline", *_pipeline_plan(src, components, variant))
    if not src.exists():
        raise WeightsError(f"{src}: no such file or folder")
    if components:
        raise ValueError(f"{src}: --components is for pipeline folders, not a single checkpoint file")
    if variant is not None:
        raise ValueError(f"{src}: --variant is for folders (diffusers' variant weight files), not a single file")
    source = open_file(src, stage, config)
    return source.format, [("", source)], []


def _pipeline_plan(src: Path, components: Sequence[str] | None, variant: str | None = None) -> tuple[list[Job], list]:
    entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    found = [p.name for p in entries if p.is_dir() and (p / "config.json").is_file()]
    if not found:
        raise WeightsError(
            f"{src}: neither a component folder (no config.json) nor a pipeline folder (no subfolder with a "
            "config.json, such as prior/ or decoder/)"
        )
    selected = found if components is None else list(components)
    unknown = [c for c in selected if c not in found]
    if unknown or not selected:
        raise WeightsError(f"{src}: no component folder(s) {unknown or selected}; this pipeline has {found}")
    jobs = [(name, open_folder(src / name, variant)) for name in selected]
    copies = [p for p in entries if p.name not in selected]
    return jobs, copies


# ---------------------------------------------------------------------------------------------------------------
# converting and writing


def _convert(source: Source, out: Path, dtype: Any, nonfinite: str) -> dict:
    bad: list[str] = []
    checked = {
        key: TensorRef(ref.shape, _finite_read(ref, key, source.file_of.get(key, source.label), nonfinite, bad))
        for key, ref in source.tensors.items()
    }
    checked_source = dataclasses.replace(source, tensors=checked)
    module, variables = module_from_source(checked_source, ShardingPlan(), dtype, place=_host_place())
    out.mkdir(parents=True, exist_ok=True)
    save_variables(variables, out / ORBAX_DIR)
    count = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"])))
    del variables
    if source.config_json is not None:
        shutil.copy2(source.config_json, out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(component_config(module), indent=2) + "\n")
    return {
        "kind": source.spec.kind,
        "config": type(source.config).__name__,
        "parameters": count,
        "state_dict_entry": source.entry or None,
        "nonfinite_tensors": bad,
    }


def _finite_read(ref: TensorRef, key: str, file: Any, policy: str, bad: list[str]):
    def read() -> Any:
        x = ref.read()  # numpy: from safetensors, or from torch through `state_dict_source`
        # A float64 sum is NaN/Inf exactly when some element is (f32 / bf16 values cannot overflow it): one pass,
        # no temporary array; the element count is only taken for the message.
        if isinstance(x, np.ndarray) and x.size and is_float(x.dtype) and not _finite_sum(x):
            n = int(x.size - np.count_nonzero(np.isfinite(x)))
            msg = f"{file}: tensor {key!r} has {n} NaN/Inf value(s) out of {x.size}"
            if policy == "error":
                raise WeightsError(f"{msg}; refusing to convert (allow with --allow-nonfinite)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            bad.append(key)
        return x

    return read


def _finite_sum(x: np.ndarray) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf is the NaN we are looking for
        return bool(np.isfinite(x.sum(dtype=np.float64)))


def _host_place():
    """Converted leaves go to host (CPU) memory: conversion never needs an accelerator, nor fills one."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes cpu
        cpu = None
    return lambda path, arr, like: jax.device_put(arr.astype(like.dtype, copy=False), cpu)


def _manifest(src: Path, source_format: str, dtype: str, sources: list[Source], copies: list[Path], report: dict):
    base = src if src.is_dir() else src.parent
    files = [f for source in sources for f in source.files]
    for path in copies:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        "format": "wurst_jax converted checkpoint",
        "format_version": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": str(src.resolve()),
        "source_format": source_format,
        "dtype": dtype,
        "components": report,
        "copied": [p.name for p in copies],
        "sha256": {str(f.relative_to(base)): _sha256(f) for f in files},
        "versions": _versions(),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("wurst_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "safetensors", "torch"):
        if package == "torch" and "torch" not in sys.modules:
            continue  # only recorded when a .pt was read
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _say(msg: str) -> None:
    print(f"[wurst_jax] convert {msg}", file=sys.stderr, flush=True)
