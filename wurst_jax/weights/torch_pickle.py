"""Original Würstchen `.pt` checkpoints, read with `torch.load(weights_only=True)` only.

A pickle can run arbitrary code when it is loaded; `weights_only=True` restricts the unpickler to tensors and
plain containers, so a file holding anything else is refused with a `WeightsError` before any of its code runs.
torch is imported here, lazily: the rest of wurst_jax never needs it. Zip-format files (every `torch.save` since
1.6) are memory-mapped, so tensors are paged in as the converter reads them. The state dict is checked before
anything is converted: string keys, dense CPU tensors of a real dtype numpy can hold (no complex, float8,
quantized or sparse tensors, which would fail late or be silently truncated).
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.mapping import TensorRef, state_dict_source
from wurst_jax.weights.safetensors_io import MAX_NDIM, clip, require_file, short

# Which entry of a training checkpoint holds the weights, in order of preference (EMA weights are the ones
# released for inference).
STATE_DICT_KEYS = ("ema_state_dict", "state_dict", "model_state_dict", "model")
# The tensor dtypes that convert: those numpy (with ml_dtypes' bfloat16) holds exactly, as in safetensors_io.
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def read_torch_checkpoint(
    path: str | os.PathLike, entries: tuple[str, ...] = STATE_DICT_KEYS
) -> tuple[dict[str, TensorRef], str]:
    """A `.pt` file → (tensor refs by name, which entry they came from: 'ema_state_dict', … or '' for the top level).

    `entries`: the entries that may hold the state dict, in order of preference (a flat dict of tensors is taken
    when none is there).

    Raises `WeightsError` for a file that is not a torch checkpoint, that holds objects other than tensors and
    containers (refused, nothing executed), or that holds no state dict of tensors.
    """
    path = Path(path)
    require_file(path)
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading .pt checkpoints needs PyTorch (pip install torch)") from None
    try:
        with warnings.catch_warnings():  # torch's own notes while rebuilding tensors ("sparse … in beta state"):
            warnings.simplefilter("ignore")  # such tensors are refused just below, in one line of ours
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers, which could run "
            f"code when loaded ({_reason(e)}); it was not loaded"
        ) from None
    except Exception as e:  # a damaged or hostile file makes torch's reader raise almost anything (KeyError, ...)
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {clip(e)})") from None
    state_dict, entry = _find_state_dict(obj, path, torch.Tensor, entries)
    _check_tensors(state_dict, path, torch)
    return state_dict_source(state_dict), entry


def _reason(e: Exception) -> str:
    """torch's weights-only message without its boilerplate (which suggests retrying with weights_only=False)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    keep = [line for line in lines if not line.startswith(skip)]
    return "; ".join(keep) or type(e).__name__


def _find_state_dict(obj: Any, path: Path, tensor_type: type, entries: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict (a state dict or a checkpoint with one), got {type(obj).__name__}")
    for entry in entries:
        if isinstance(obj.get(entry), Mapping):
            return _tensors_only(obj[entry], path, tensor_type, entry), entry
    if obj and all(isinstance(v, tensor_type) for v in obj.values()):
        return dict(obj), ""
    raise WeightsError(
        f"{path}: no state dict found: expected one of the entries {list(entries)} or a flat dict of "
        f"tensors; top-level keys are {', '.join(sorted(short(k, 60) for k in obj)[:20])}"
    )


def _tensors_only(sd: Mapping, path: Path, tensor_type: type, entry: str) -> dict[str, Any]:
    bad = [short(k, 60) for k, v in sd.items() if not isinstance(v, tensor_type)]
    if bad:
        raise WeightsError(f"{path}: entry {entry!r} holds values that are not tensors: {', '.join(bad[:10])}")
    if not sd:
        raise WeightsError(f"{path}: entry {entry!r} is empty")
    return dict(sd)


def _check_tensors(sd: dict[Any, Any], path: Path, torch: Any) -> None:
    """Refuse non-string keys and tensors that cannot be converted faithfully, naming up to 5 of each."""
    keys = [k for k in sd if not isinstance(k, str)]
    if keys:
        names = ", ".join(short(k, 60) for k in keys[:5])
        raise WeightsError(f"{path}: state dict keys must be tensor names (strings); {len(keys)} are not: {names}")
    bad = []
    for key, t in sd.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if t.layout != torch.strided:
            bad.append(f"{short(key, 60)} ({str(t.layout).removeprefix('torch.')})")
        elif dtype not in DTYPES:
            bad.append(f"{short(key, 60)} ({dtype})")
        elif t.device.type != "cpu":  # a `meta` tensor has a shape but no data
            bad.append(f"{short(key, 60)} (on {t.device.type}, no data)")
        elif t.dim() > MAX_NDIM:
            bad.append(f"{short(key, 60)} ({t.dim()} dimensions)")
    if bad:
        raise WeightsError(
            f"{path}: {len(bad)} tensor(s) cannot be converted: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; "
            f"expected dense CPU tensors of dtype {', '.join(DTYPES)} with at most {MAX_NDIM} dimensions"
        )
