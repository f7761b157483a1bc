"""`wurst-jax convert SRC DST`: PyTorch checkpoints → converted folders that load without PyTorch or conversion.

SRC is a diffusers pipeline folder (`warp-ai/wuerstchen`, `warp-ai/wuerstchen-prior`, or a combined one with
`prior_*` parts), one component folder (config.json + safetensors), an original Würstchen `.pt` checkpoint (read
with `torch.load(weights_only=True)`: a pickle holding anything but tensors is refused) or a single original-layout
`.safetensors` file; the last two have no config.json, so `stage` names the component and the official v2 config
is used unless `config` is given. For `stage="effnet"` (the EfficientNet semantic encoder) the variant and the
mapper's BatchNorm are read off the tensor names: Würstchen v2's `model_v2_stage_b.pt` keeps it under
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

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from wurst_jax.models import EfficientNetConfig, StageAConfig, StageBConfig, StageCConfig, abstract_variables
from wurst_jax.output_dir import check_destination, run_writer, staged_folder
from wurst_jax.weights import WeightsError, build_module, read_config
from wurst_jax.weights.convert import TensorRef, convert, unwrapped
from wurst_jax.weights.export import component_config
from wurst_jax.weights.load import config_from_dict, source_layout
from wurst_jax.weights.orbax_io import ORBAX_DIR, save_variables
from wurst_jax.weights.safetensors_io import SafetensorsFile, iter_tensors, weight_files

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STAGES = ("prior", "decoder", "vqgan", "effnet")
MANIFEST = "wurst_jax_manifest.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_PRESETS = {"prior": StageCConfig, "decoder": StageBConfig, "vqgan": StageAConfig, "effnet": EfficientNetConfig}
_CLASS_STAGES = {
    "WuerstchenPrior": "prior",
    "WuerstchenDiffNeXt": "decoder",
    "PaellaVQModel": "vqgan",
    "EfficientNetEncoder": "effnet",
}
# Tensor names that only one kind of checkpoint has (after `module.` / `_orig_mod.` prefixes are dropped).
_MARKERS = (
    ("vqgan", re.compile(r"^vquantizer\.")),
    ("decoder", re.compile(r"^(effnet_mappers|clip_mapper)\.")),
    ("prior", re.compile(r"^cond_mapper\.")),
    ("text_encoder", re.compile(r"(^|\.)token_embedding\.")),
    ("effnet", re.compile(r"^backbone\.\d+\.")),
)


@dataclasses.dataclass
class _Job:
    """One component to convert: where it goes in DST, what it is, and its (not yet read) tensors."""

    name: str  # the folder under DST ("" when DST is the component folder itself)
    kind: str
    config: Any
    source: dict[str, TensorRef]
    file_of: dict[str, Path]  # tensor → the file it is read from (for messages)
    files: list[Path]  # every source file the component reads
    label: str
    config_json: Path | None = None  # copied when SRC has one, else written from `config`
    entry: str = ""  # the .pt entry the state dict came from


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
) -> Path:
    """Convert `src` (see the module docstring) into the converted folder `dst`; returns `dst`.

    `dtype`: "float32" or "bfloat16" (the stored parameter dtype; BatchNorm statistics stay f32).
    `components`: the component folders of a pipeline to convert (e.g. ["prior", "text_encoder"]); the others
    are copied unchanged, so DST still loads as a whole pipeline. `overwrite`: replace an existing DST (only once
    the new one is complete). `nonfinite`: "error" refuses NaN / Inf weights, "warn" converts them with a
    warning. `stage` ("prior", "decoder", "vqgan", "effnet") and `config` (a dict, a config.json path or a JSON string)
    are for single-file sources.
    """
    src, dst = Path(src), Path(dst)
    dtype_name = _dtype_name(dtype)
    if nonfinite not in ("error", "warn"):
        raise ValueError(f"nonfinite must be 'error' or 'warn', got {nonfinite!r}")
    check_destination(src, dst, overwrite)
    source_format, jobs, copies = _plan(src, components, stage, config)
    say = _say if progress else lambda _: None
    with staged_folder(dst, overwrite) as tmp:
        report = {}
        for job in jobs:
            t0 = time.perf_counter()
            report[job.name or job.kind] = _convert_job(job, tmp / job.name, DTYPES[dtype_name], nonfinite)
            say(f"{job.name or job.kind}: {len(job.source)} tensors → {dtype_name} in {time.perf_counter() - t0:.1f} s")
        for path in copies:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        manifest = _manifest(src, source_format, dtype_name, jobs, copies, report)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {dst}")
    return dst


def detect_stage(keys: Sequence[str]) -> str | None:
    """Which component a set of tensor names belongs to ("prior", "decoder", "vqgan", "text_encoder"), if clear."""
    stripped = [unwrapped(k) for k in keys]
    for stage, pattern in _MARKERS:
        if any(pattern.search(k) for k in stripped):
            return stage
    return None


# ---------------------------------------------------------------------------------------------------------------
# what to convert


def _plan(src: Path, components: Sequence[str] | None, stage: str | None, config: Any) -> tuple[str, list, list]:
    """(source format, jobs, paths to copy); every config and safetensors header is read and checked here."""
    if components is not None:
        components = [c.strip() for c in ([components] if isinstance(components, str) else components) if c.strip()]
    if src.is_dir():
        if stage is not None or config is not None:
            raise ValueError(f"{src}: --stage / --config are for single checkpoint files; a folder has config.json")
        if (src / "config.json").is_file():
            job = _folder_job(src, "")
            if components and set(components) != {job.kind}:
                raise WeightsError(f"{src}: a single {job.kind} component folder; --components {components} do not fit")
            return "diffusers-component", [job], []
        return ("diffusers-pipeline", *_pipeline_plan(src, components))
    if not src.exists():
        raise WeightsError(f"{src}: no such file or folder")
    if components:
        raise ValueError(f"{src}: --components is for pipeline folders, not a single checkpoint file")
    return _file_plan(src, stage, config)


def _pipeline_plan(src: Path, components: Sequence[str] | None) -> tuple[list, list]:
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
    jobs = [_folder_job(src / name, name) for name in selected]
    copies = [p for p in entries if p.name not in selected]
    return jobs, copies


def _folder_job(folder: Path, name: str) -> _Job:
    kind, cfg = read_config(folder)
    stem, _, _ = source_layout(kind)
    files = weight_files(folder, stem)
    source, file_of = {}, {}
    for key, f in iter_tensors(files):
        source[key] = TensorRef(f.shape(key), (lambda f=f, k=key: f.get(k)))
        file_of[key] = f.path
    label = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return _Job(name, kind, cfg, source, file_of, [folder / "config.json", *files], label, folder / "config.json")


def _file_plan(path: Path, stage: str | None, config: Any) -> tuple[str, list, list]:
    entry = ""
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        source = {k: TensorRef(f.shape(k), (lambda k=k: f.get(k))) for k in f.keys()}
        source_format = "original-safetensors"
    elif path.suffix in PICKLE_SUFFIXES:
        from wurst_jax.weights.torch_pickle import STATE_DICT_KEYS, read_torch_checkpoint

        # a Stage B training checkpoint holds the decoder and, under effnet_state_dict, the semantic encoder
        entries = ("effnet_state_dict",) if stage == "effnet" else STATE_DICT_KEYS
        source, entry = read_torch_checkpoint(path, entries)
        source_format = "original-pt"
    else:
        raise WeightsError(f"{path}: unknown checkpoint format (expected a folder, .safetensors or {PICKLE_SUFFIXES})")
    detected = detect_stage(list(source))
    if stage is None:
        hint = f"its tensors look like a {detected} checkpoint" if detected else f"one of {STAGES}"
        raise WeightsError(f"{path}: a single checkpoint file has no config.json: pass --stage ({hint})")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if detected is not None and detected != stage:
        example = next(k for k in source if dict(_MARKERS)[detected].search(unwrapped(k)))
        raise WeightsError(f"{path}: --stage {stage}, but its tensors are a {detected} checkpoint's ({example!r})")
    cfg = _stage_config(stage, config, list(source))
    job = _Job("", stage, cfg, source, dict.fromkeys(source, path), [path], str(path), None, entry)
    return source_format, [job], []


def _stage_config(stage: str, config: Any, keys: Sequence[str] = ()) -> Any:
    cls = _PRESETS[stage]
    if config is None and stage == "effnet":
        return _effnet_config(keys)
    if config is None:
        return cls.v2()
    name = "--config"
    if isinstance(config, Mapping):
        raw = dict(config)
    else:
        text, name = str(config), "--config JSON"
        if not text.lstrip().startswith("{"):
            path = Path(config)
            if not path.is_file():
                raise WeightsError(f"{path}: no such config file (--config takes a config.json path or JSON)")
            text, name = path.read_text(), str(path)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{name}: expected a JSON object")
    other = _CLASS_STAGES.get(raw.get("_class_name"), stage)
    if other != stage:
        raise WeightsError(f"{name}: a {raw['_class_name']} config, but --stage is {stage}")
    return config_from_dict(cls, raw, name)


def _effnet_config(keys: Sequence[str]) -> EfficientNetConfig:
    """EfficientNetV2-S or -L (the -L backbone has a 9th part, `backbone.8`), mapper BatchNorm affine or not."""
    names = {unwrapped(k) for k in keys}
    large = any(k.startswith("backbone.8.") for k in names)
    return EfficientNetConfig(
        effnet="efficientnet_v2_l" if large else "efficientnet_v2_s", mapper_affine="mapper.1.weight" in names
    )


# ---------------------------------------------------------------------------------------------------------------
# converting and writing


def _convert_job(job: _Job, out: Path, dtype: Any, nonfinite: str) -> dict:
    module = build_module(job.kind, job.config, dtype)
    try:
        target = abstract_variables(module)
    except Exception as e:  # a config that passes the dataclass checks but cannot build the network
        raise WeightsError(f"{job.config_json or job.label}: this config cannot build a model: {e!r}") from None
    _, ignore, root = source_layout(job.kind)
    bad: list[str] = []
    checked = {
        key: TensorRef(ref.shape, _finite_read(ref, key, job.file_of.get(key, job.label), nonfinite, bad))
        for key, ref in job.source.items()
    }
    variables = convert(checked, target, job.label, ignore, root, place=_host_place())
    out.mkdir(parents=True, exist_ok=True)
    save_variables(variables, out / ORBAX_DIR)
    del variables
    if job.config_json is not None:
        shutil.copy2(job.config_json, out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(component_config(module), indent=2) + "\n")
    return {
        "kind": job.kind,
        "config": type(job.config).__name__,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(target["params"]))),
        "state_dict_entry": job.entry or None,
        "nonfinite_tensors": bad,
    }


def _finite_read(ref: TensorRef, key: str, file: Any, policy: str, bad: list[str]):
    def read() -> Any:
        x = ref.read()  # numpy: from safetensors, or from torch through `state_dict_source`
        # A float64 sum is NaN/Inf exactly when some element is (f32 / bf16 values cannot overflow it): one pass,
        # no temporary array; the element count is only taken for the message.
        if isinstance(x, np.ndarray) and x.size and _is_float(x.dtype) and not _finite_sum(x):
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


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)


def _host_place():
    """Converted leaves go to host (CPU) memory: conversion never needs an accelerator, nor fills one."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes cpu
        cpu = None
    return lambda path, arr, like: jax.device_put(arr.astype(like.dtype, copy=False), cpu)


def _manifest(src: Path, source_format: str, dtype: str, jobs: list[_Job], copies: list[Path], report: dict) -> dict:
    base = src if src.is_dir() else src.parent
    files = [f for job in jobs for f in job.files]
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


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return name


def _say(msg: str) -> None:
    print(f"[wurst_jax] convert {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_convert_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `wurst-jax convert` (shared with the scripts in convert/)."""
    p.add_argument("src", metavar="SRC", help="diffusers pipeline or component folder, original .pt or .safetensors")
    p.add_argument("dst", metavar="DST", help="output folder (same layout as SRC: config.json + orbax/ per component)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="stored parameter dtype (float32)")
    p.add_argument(
        "--components",
        type=lambda s: [c for c in s.split(",") if c],
        help="comma-separated component folders of a pipeline to convert (default: all); others are copied",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (once the new one is complete)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/Inf weights with a warning")
    p.add_argument(
        "--stage", choices=STAGES, help="component of a single .pt / .safetensors file (effnet: the semantic encoder)"
    )
    p.add_argument("--config", help="config.json path or JSON for a single file (default: the official v2 config)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `convert` subcommand on `subparsers` (run it with `run_convert(args)`)."""
    p = subparsers.add_parser(
        "convert",
        help="convert PyTorch checkpoints into folders that load without conversion",
        description=__doc__.split("\n\n")[0],
    )
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command: 0 on success, 2 for bad input, 130 when interrupted."""
    return run_writer(
        "convert",
        args.dst,
        lambda: convert_checkpoint(
            args.src,
            args.dst,
            dtype=args.dtype,
            components=args.components,
            overwrite=args.overwrite,
            nonfinite="warn" if args.allow_nonfinite else "error",
            stage=args.stage,
            config=args.config,
            progress=not args.quiet,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m wurst_jax.conversion SRC DST ...`, the same as `wurst-jax convert`."""
    parser = add_convert_arguments(argparse.ArgumentParser(prog="wurst-jax convert", description=__doc__))
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
