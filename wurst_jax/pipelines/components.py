"""Pipeline folders → components: the loaded stages (`Component`, with model offloading), the tokenizer and the
sampler of a diffusers-layout pipeline folder, local or from the Hub.

`Component` holds a module and its variables; with `offload=True` the variables live in host memory and are put
on the device only while their stage runs (the JAX form of diffusers' model offloading).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from wurst_jax.pipelines.tokenizer import load_tokenizer
from wurst_jax.samplers import DDPMWuerstchen, sampler_from_config
from wurst_jax.sharding import ShardingPlan
from wurst_jax.weights import WeightsError
from wurst_jax.weights.load import load_with_plan


@dataclasses.dataclass
class Component:
    """A loaded stage: `module` and its `variables` (on the device, or on the host when `offload`).

    `offload="sequential"` on a module with repeated blocks it can stream (`stream_blocks`: the v2 prior) keeps the
    variables in the device's host memory (pinned where the backend has it); the stage's loop moves the small
    leaves to the device once and one block repeat's parameters per scan step (`runner.run_loop`). Other modules
    fall back to model offloading (`offload=True`)."""

    module: nn.Module
    variables: Any
    offload: bool | str = False

    def __post_init__(self):
        self.shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.variables)
        if self.offload not in (False, True, "model", "sequential"):
            raise ValueError(f"offload={self.offload!r}: expected False, True / 'model', or 'sequential'")
        self.streams = self.offload == "sequential" and hasattr(self.module, "stream_blocks")
        if self.streams:
            kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
            host = "pinned_host" if "pinned_host" in kinds else "unpinned_host"
            shardings = jax.tree_util.tree_map(lambda s: s.with_memory_kind(host), self.shardings)
            self.variables = jax.device_put(self.variables, shardings)
            return
        if self.offload:
            if not all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(self.variables)):
                raise ValueError("offload=True keeps whole stages in this host's memory: not available across hosts")
            self.variables = jax.device_get(self.variables)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[Any]:
        if not self.offload or self.streams:  # streamed: the loop moves them itself
            yield self.variables
            return
        on_device = jax.device_put(self.variables, self.shardings)
        try:
            yield on_device
        finally:
            for leaf in jax.tree_util.tree_leaves(on_device):
                leaf.delete()


def resolve(path: str | os.PathLike) -> Path:
    """A local folder, or a Hub id (`org/name`) downloaded with huggingface_hub when a network exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path)))
        except Exception as e:  # no network, unknown repo, no access: say which and why
            raise WeightsError(f"{path}: not a local folder, and downloading it from the Hub failed: {e}") from None
    raise WeightsError(f"{path}: no such folder")


def read_preprocessor_config(folder: Path) -> dict[str, Any]:
    """A `CLIPImageProcessor` folder's preprocessor_config.json as a dict."""
    path = folder / "preprocessor_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return raw


def load_pipeline_folder(
    path: str | os.PathLike,
    parts: tuple[str, ...],
    dtype: Any,
    offload: bool,
    prefix: str = "",
    plan: ShardingPlan | None = None,
    optional: tuple[str, ...] = (),
    variant: str | None = None,
) -> dict[str, Any]:
    """Load `parts` (component folder names, with `prefix` as in a combined folder) from a pipeline folder, plus
    its `config` (model_index.json) and `scheduler` (the sampler of `<prefix>scheduler/`, default DDPM-Würstchen).
    `optional` parts are loaded when their folder exists, else None (`feature_extractor`: the dict of its
    preprocessor_config.json). `variant` ("bf16") reads every model's diffusers variant weight files
    (`diffusion_pytorch_model.bf16.safetensors`, `model.bf16.safetensors`, sharded or not), as diffusers'
    `from_pretrained(variant=...)`.
    """
    root = resolve(path)
    missing = [prefix + p for p in parts if not (root / (prefix + p)).is_dir()]
    if missing:
        raise WeightsError(f"{root}: missing component folder(s) {missing}; expected {[prefix + p for p in parts]}")
    out: dict[str, Any] = {"config": {}}
    index = root / "model_index.json"
    if index.is_file():
        out["config"] = json.loads(index.read_text())
    sched_file = root / f"{prefix}scheduler" / "scheduler_config.json"
    out["scheduler"] = (
        sampler_from_config(json.loads(sched_file.read_text())) if sched_file.is_file() else DDPMWuerstchen()
    )
    plan = plan or ShardingPlan()
    present = [p for p in optional if (root / (prefix + p)).is_dir()]
    out.update(dict.fromkeys(optional))
    for part in (*parts, *present):
        folder = root / (prefix + part)
        if part == "feature_extractor":
            out[part] = read_preprocessor_config(folder)
        elif part == "tokenizer":
            out[part] = load_tokenizer(folder)  # CLIP without transformers (pipelines/tokenizer.py)
        else:
            out[part] = Component(*load_with_plan(folder, plan, dtype, variant=variant), offload=offload)
    return out
