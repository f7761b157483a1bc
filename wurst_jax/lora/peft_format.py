"""diffusers / PEFT LoRA files ↔ adapters (`adapter.py`).

The file diffusers' `save_lora_weights` writes (and `load_lora_weights` reads) for Würstchen v2's prior pipeline is
`pytorch_lora_weights.safetensors` with keys `<component>.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r], `<component>` being `prior` or `text_encoder` (`text_encoder.text_model.encoder.layers.0.self_attn.
q_proj...`). PEFT's scaling `lora_alpha / r` is not in the file unless kohya-style `<module>.alpha` entries are:
without them diffusers uses alpha = r (scaling 1), and so do we. A file is checked whole before anything is used:
every unknown, unpaired or mis-shaped key is listed in one `LoraError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from wurst_jax.lora.adapter import Adapter, check_against
from wurst_jax.weights import layout

FILE_NAME = "pytorch_lora_weights.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.(?P<side>lora_A|lora_B)(?:\.(?P<adapter>[\w-]+))?\.weight$")


class LoraError(ValueError):
    """A LoRA file that does not fit the model (every problem listed)."""


def lora_path(path: str | os.PathLike) -> Path:
    """A `.safetensors` file, or a folder holding `pytorch_lora_weights.safetensors` (or the original Stable
    Cascade training's `lora.safetensors`)."""
    from wurst_jax.lora.cascade_format import FILE_NAME as CASCADE_FILE

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FILE_NAME if (p / FILE_NAME).is_file() or not (p / CASCADE_FILE).is_file() else p / CASCADE_FILE
    if not p.is_file():
        raise LoraError(
            f"{path}: no LoRA file (expected a .safetensors file or a folder with {FILE_NAME} or {CASCADE_FILE})"
        )
    return p


def read_lora_file(
    path: str | os.PathLike, targets: dict[str, Any], module_filters: Any = None, added: Any = None
) -> dict[str, Adapter]:
    """The adapters in a diffusers/PEFT LoRA file, one per component prefix in `targets` (prefix → that
    component's variable tree, or its `jax.eval_shape`); components without keys are left out. A file in the
    original Stable Cascade format (`cascade_format.py`) is read as such; `module_filters` are its training
    config's (default `['.attn']`); `added`: its ReToken's added tokens (`cascade_format.from_state_dict`)."""
    from safetensors.numpy import load_file

    from wurst_jax.lora import cascade_format

    file = lora_path(path)
    try:
        tensors = load_file(str(file))
    except Exception as e:  # not safetensors, truncated, bf16 numpy cannot hold, ...
        tensors = _load_with_torch(file, e)
    if cascade_format.is_cascade_file(tensors):
        if "prior" not in targets:
            raise LoraError(f"{file}: an original Stable Cascade LoRA (stage C); this pipeline has no prior")
        return cascade_format.from_state_dict(tensors, targets, str(file), module_filters, added)
    if added is not None:
        raise LoraError(f"{file}: train_tokens apply to original Stable Cascade LoRA files; this one is PEFT's")
    if module_filters is not None:
        raise LoraError(f"{file}: module_filters applies to original Stable Cascade LoRA files; this one is PEFT's")
    return from_state_dict(tensors, targets, str(file))


def _load_with_torch(file: Path, err: Exception) -> dict[str, np.ndarray]:
    try:
        from safetensors.torch import load_file

        return {k: v.float().numpy() for k, v in load_file(str(file)).items()}
    except Exception:
        raise LoraError(f"{file}: not a readable safetensors file ({err})") from None


def from_state_dict(tensors: dict[str, Any], targets: dict[str, Any], where: str = "LoRA") -> dict[str, Adapter]:
    problems: list[str] = []
    pairs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in targets or not rest:
            problems.append(f"{key}: unknown component (expected a key starting with one of {sorted(targets)})")
            continue
        if rest.endswith(".alpha"):
            alphas[(prefix, rest.removesuffix(".alpha"))] = float(np.asarray(value).reshape(-1)[0])
            continue
        m = _KEY.match(rest)
        if not m:
            problems.append(f"{key}: not a LoRA key (expected <module>.lora_A.weight / <module>.lora_B.weight)")
            continue
        pairs.setdefault((prefix, m["module"]), {})[m["side"]] = np.asarray(value, np.float32)
    adapters: dict[str, Adapter] = {}
    names: dict[tuple[str, str], str] = {}
    for (prefix, module), ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"{prefix}.{module}: has {sorted(ab)} but needs both lora_A and lora_B")
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        path = _flax_path(targets[prefix], module)
        if path is None:
            problems.append(f"{prefix}.{module}: no such Linear layer in the {prefix}")
            continue
        if a.ndim != 2 or b.ndim != 2:
            problems.append(f"{prefix}.{module}: lora_A {a.shape} / lora_B {b.shape} must be 2-D (Linear layers only)")
            continue
        rank = a.shape[0]
        scale = alphas.get((prefix, module), rank) / rank
        names[(prefix, "/".join(path))] = f"{prefix}.{module}"
        adapters.setdefault(prefix, {})["/".join(path)] = {"down": a.T.copy(), "up": (b.T * scale).astype(np.float32)}
    for prefix, layers in adapters.items():
        problems += [f"{names[(prefix, k)]}: {why}" for k, why in check_against(targets[prefix], layers)]
    if problems:
        raise LoraError(f"{where}: {len(problems)} problem(s), nothing applied:\n  " + "\n  ".join(problems))
    if not adapters:
        raise LoraError(f"{where}: no LoRA weights in it")
    return adapters


def _flax_path(tree: Any, module: str) -> tuple[str, ...] | None:
    """The Flax kernel path of a torch Linear name, trying with and without a `text_model.`-style root."""
    names = [module]
    first, _, rest = module.partition(".")
    if rest:
        names.append(rest)
    for name in names:
        for cand in layout.flax_candidates(name + ".weight"):
            node = tree
            try:
                for p in cand:
                    node = node[p]
            except (KeyError, TypeError):
                continue
            return cand
    for cand in layout.flax_candidates(module + ".weight"):
        for root in ("text_model",):
            node, full = tree, (cand[0], root, *cand[1:])
            try:
                for p in full:
                    node = node[p]
            except (KeyError, TypeError):
                continue
            return full
    return None


def to_state_dict(adapters: dict[str, Adapter]) -> dict[str, np.ndarray]:
    """Adapters → the diffusers/PEFT keys and layouts (alpha folded in, so readers use alpha = r)."""
    out: dict[str, np.ndarray] = {}
    for prefix, layers in adapters.items():
        for key, ab in layers.items():
            name = layout.torch_key(tuple(key.split("/")))
            if name is None or not name.endswith(".weight"):
                raise LoraError(f"{prefix}/{key}: has no PyTorch Linear name")
            module = name.removesuffix(".weight")
            out[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["down"], np.float32).T)
            out[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["up"], np.float32).T)
    return out


def write_lora_file(path: str | os.PathLike, adapters: dict[str, Adapter]) -> Path:
    """Write `adapters` (component prefix → adapter) where diffusers' `load_lora_weights(path)` finds them: `path`
    is a folder (→ `pytorch_lora_weights.safetensors` in it) or a `.safetensors` file name."""
    from safetensors.numpy import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / FILE_NAME
    save_file(to_state_dict(adapters), str(p), metadata={"format": "pt"})
    return p
