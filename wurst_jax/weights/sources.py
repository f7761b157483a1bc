"""Opening a source of PyTorch weights: a component folder, an original single `.safetensors` file or a `.pt`
checkpoint → a `Source`: its registry spec, its config, and its tensors by name, not yet read.

A component folder has a `config.json` (diffusers `_class_name`, or transformers' `architectures` /
`model_type`), which names the component kind through the registry, and its weights file(s)
(`<stem>.safetensors` or the shards of `<stem>.safetensors.index.json`). A single file has no config: the caller
names its `stage` (checked against the tensor names that identify each kind), and the config is the one given, or
the one the registry reads off the tensors (the released model's by default). `load_component` and
`convert_checkpoint` both open their sources here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wurst_jax.models import bounds, registry
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.mapping import TensorRef, unwrapped
from wurst_jax.weights.safetensors_io import SafetensorsFile, iter_tensors, weight_files

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclasses.dataclass
class Source:
    """One component's weights, opened: every header read and checked, no tensor read yet."""

    spec: registry.ComponentSpec
    config: Any
    tensors: dict[str, TensorRef]
    file_of: dict[str, Path]  # tensor → the file it is read from (for messages)
    files: list[Path]  # every file the component reads (config.json included)
    label: str  # the file or folder, for messages
    config_json: Path | None = None  # the folder's config.json, when there is one
    entry: str = ""  # the .pt entry the state dict came from
    format: str = "diffusers-component"


def read_config(folder: str | Path) -> tuple[str, Any]:
    """`config.json` of a component folder → (kind, config dataclass)."""
    spec, config = _read_config(Path(folder))
    return spec.kind, config


def _read_config(folder: Path) -> tuple[registry.ComponentSpec, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder}: no config.json (expected a diffusers or transformers component folder)")
    raw = _json_object(path.read_bytes(), str(path))
    names = [raw.get("_class_name"), *(raw.get("architectures") or []), raw.get("model_type")]
    spec = registry.for_class_names(names)
    if spec is None:
        known = ", ".join(registry.class_names())
        what = raw.get("_class_name") or raw.get("model_type")
        raise WeightsError(f"{path}: not a wurst_jax component (class {what!r}; known: {known})")
    return spec, config_from_dict(spec.config, raw, str(path))


def _json_object(text: str | bytes, name: str) -> dict:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an integer of 5000 digits
        raise WeightsError(f"{name}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{name}: expected a JSON object")
    return raw


def config_from_dict(cls: type, raw: Mapping[str, Any], name: str) -> Any:
    """Build a config dataclass from a config.json dict, keeping the keys the dataclass knows; values beyond the
    sanity bounds of `models/bounds.py` are refused first."""
    try:
        bounds.check_values(cls, raw, name)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in raw:
            value = raw[field.name]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{name}: invalid {cls.__name__}: {e}") from None
    try:
        bounds.check_blocks(config, name)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    return config


def open_folder(folder: str | Path, variant: str | None = None) -> Source:
    """A component folder (config.json + safetensors, single or sharded); `variant` ("bf16") picks diffusers'
    variant files (`<stem>.bf16.safetensors`, `<stem>.safetensors.index.bf16.json`)."""
    folder = Path(folder)
    spec, config = _read_config(folder)
    files = weight_files(folder, spec.weights_stem, variant)
    tensors, file_of = {}, {}
    for key, f in iter_tensors(files):
        tensors[key] = TensorRef(f.shape(key), (lambda f=f, k=key: f.get(k)))
        file_of[key] = f.path
    label = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    config_json = folder / "config.json"
    return Source(spec, config, tensors, file_of, [config_json, *files], label, config_json)


def open_file(path: str | Path, stage: str | None, config: Any = None) -> Source:
    """An original single-file checkpoint (`.safetensors`, or `.pt` read with `torch.load(weights_only=True)`).

    `stage` names the component (one of `registry.single_file_stages()`); `config` is a dict, a config.json path
    or a JSON string, else the registry reads the config off the tensors.
    """
    path = Path(path)
    stages = registry.single_file_stages()
    if stage is not None and stage not in stages:
        raise ValueError(f"stage must be one of {stages}, got {stage!r}")
    entry = ""
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        tensors = {k: TensorRef(f.shape(k), (lambda k=k: f.get(k))) for k in f.keys()}
        source_format = "original-safetensors"
    elif path.suffix in PICKLE_SUFFIXES:
        from wurst_jax.weights.torch_pickle import STATE_DICT_KEYS, read_torch_checkpoint

        # a Stage B training checkpoint holds the decoder and, under effnet_state_dict, the semantic encoder
        entries = ("effnet_state_dict",) if stage == "effnet" else STATE_DICT_KEYS
        tensors, entry = read_torch_checkpoint(path, entries)
        source_format = "original-pt"
    else:
        raise WeightsError(f"{path}: unknown checkpoint format (expected a folder, .safetensors or {PICKLE_SUFFIXES})")
    shapes = {unwrapped(k): tuple(ref.shape) for k, ref in tensors.items()}
    detected = registry.detect(list(shapes))
    if stage is None:
        hint = f"its tensors look like a {detected[0].kind} checkpoint" if detected else f"one of {stages}"
        raise WeightsError(f"{path}: a single checkpoint file has no config.json: pass --stage ({hint})")
    spec = _spec_for_stage(stage, detected, shapes, path)
    if config is not None:
        cfg = _given_config(spec, config, stage)
    else:
        try:
            cfg = spec.single_file_config(shapes)
        except (KeyError, ValueError) as e:
            raise WeightsError(f"{path}: --stage {stage}: {e}") from None
    return Source(spec, cfg, tensors, dict.fromkeys(tensors, path), [path], str(path), None, entry, source_format)


def _spec_for_stage(stage: str, detected: tuple | None, shapes: dict, path: Path) -> registry.ComponentSpec:
    """The kind `--stage` names, refused when the tensors clearly belong to another kind or another of its stages."""
    candidates = [s for s in registry.specs() if stage in s.stages]
    if detected is not None:
        spec, example = detected
        if stage not in spec.stages:
            raise WeightsError(f"{path}: --stage {stage}, but its tensors are a {spec.kind} checkpoint's ({example!r})")
        if spec.stage_of is not None and (actual := spec.stage_of(shapes)) != stage:
            raise WeightsError(f"{path}: --stage {stage}, but its tensors are a {actual} checkpoint's")
        return spec
    return candidates[0]


def _given_config(spec: registry.ComponentSpec, config: Any, stage: str) -> Any:
    name = "--config"
    if isinstance(config, Mapping):
        raw = dict(config)
    else:
        text, name = str(config), "--config JSON"
        if not text.lstrip().startswith("{"):
            path = Path(config)
            if not path.is_file():
                raise WeightsError(f"{path}: no such config file (--config takes a config.json path or JSON)")
            text, name = path.read_bytes(), str(path)
        raw = _json_object(text, name)
    other = registry.for_class_names([raw.get("_class_name")])
    if other is not None and stage not in other.stages:
        raise WeightsError(f"{name}: a {raw['_class_name']} config, but --stage is {stage}")
    if other is not None:
        spec = other
    return config_from_dict(spec.config, raw, name)


def open_source(src: str | Path, stage: str | None = None, config: Any = None) -> Source:
    """A component folder or a single file (see `open_folder` / `open_file`)."""
    src = Path(src)
    if src.is_dir():
        if stage is not None or config is not None:
            raise ValueError(f"{src}: --stage / --config are for single checkpoint files; a folder has config.json")
        return open_folder(src)
    if not src.exists():
        raise WeightsError(f"{src}: no such file or folder")
    return open_file(src, stage, config)


def detect_stage(keys: Sequence[str]) -> str | None:
    """Which component kind a set of tensor names belongs to, if clear."""
    found = registry.detect([unwrapped(k) for k in keys])
    return found[0].kind if found else None
