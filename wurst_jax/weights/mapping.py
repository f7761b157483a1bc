"""PyTorch state dict → Flax variables: names and layouts by `layout.py`, checked against `jax.eval_shape`.

Original-repo and wrapped names are first rewritten to diffusers' (`module.` / `_orig_mod.` prefixes dropped,
`attn.in_proj_weight` split into to_q/to_k/to_v, `attn.out_proj` → `to_out.0`, `vquantizer.codebook` →
`vquantizer.embedding`). Every key is matched and every shape checked before the first tensor is read; any
mismatch raises one `WeightsError` listing all missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from wurst_jax.weights import layout
from wurst_jax.weights.errors import WeightsError, mismatch_error
from wurst_jax.weights.layout import Path


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A source tensor known by shape before it is read: `read()` returns it as a numpy array."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


_PREFIXES = ("module.", "_orig_mod.")
_ORIGINAL_RENAMES = (
    (re.compile(r"(^|\.)attn\.out_proj\."), r"\1to_out.0."),
    (re.compile(r"^vquantizer\.codebook\."), "vquantizer.embedding."),
)
_IN_PROJ = re.compile(r"(?:^|(?<=\.))attn\.in_proj_(weight|bias)$")
_SKIP_LEAVES = {"num_batches_tracked"}


def unwrapped(key: str) -> str:
    """A tensor name without the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add."""
    for p in _PREFIXES:
        key = key.removeprefix(p)
    return key


def canonical_source(
    source: Mapping[str, TensorRef], root: str = "", renames: tuple[tuple[str, str], ...] = ()
) -> dict[str, TensorRef]:
    """Rewrite original-repo / wrapped names to diffusers names, splitting fused in_proj into q, k, v.

    `root` is a top-level module name that some writers omit (transformers ≥ 5 saves CLIP without `text_model.`).
    `renames` are one component kind's own (regex, replacement) pairs, applied after the shared ones (the original
    Stable Cascade stage B's `clip_mapper` is diffusers' `clip_txt_pooled_mapper`, but v2's `clip_mapper` stays).
    """
    out: dict[str, TensorRef] = {}
    for original, ref in source.items():
        key = unwrapped(original)
        if root and not key.startswith(root):
            key = root + key
        for pattern, repl in _ORIGINAL_RENAMES:
            key = pattern.sub(repl, key)
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        m = _IN_PROJ.search(key)
        if m and ref.shape and ref.shape[0] % 3 == 0:
            n = ref.shape[0] // 3
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                part = lambda r=ref.read, i=i, n=n: r()[i * n : (i + 1) * n]
                _put(out, key[: m.start()] + f"{name}.{m.group(1)}", TensorRef((n, *ref.shape[1:]), part), original)
        else:
            _put(out, key, ref, original)
    return out


def _put(out: dict[str, TensorRef], key: str, ref: TensorRef, original: str) -> None:
    if key in out:
        raise WeightsError(f"two source tensors map to {key!r} (the second is {original!r})")
    out[key] = ref


def to_variables(
    source: Mapping[str, TensorRef],
    target: Any,
    name: str,
    ignore: tuple[str, ...] = (),
    root: str = "",
    place: Callable[[Path, np.ndarray, Any], jax.Array] | None = None,
    renames: tuple[tuple[str, str], ...] = (),
) -> dict:
    """Convert `source` into a variables tree shaped like `target` (a `jax.eval_shape` tree of the module).

    `name` (the file or folder) goes into every error message. `ignore` holds regexes of source keys that are
    dropped silently (buffers such as CLIP's `position_ids`); for `root` and `renames` see `canonical_source`.
    `place(path, array, target_leaf)` puts each converted leaf on device(s) — by default `jnp.asarray` in the
    target dtype — so no full host copy of the tree is ever built.
    """
    flat_target = traverse_util.flatten_dict(target)
    plan: dict[Path, tuple[str, TensorRef]] = {}
    unexpected, misshaped, misshaped_paths = [], [], set()
    for key, ref in canonical_source(source, root, renames).items():
        if any(re.search(p, key) for p in ignore) or key.rsplit(".", 1)[-1] in _SKIP_LEAVES:
            continue
        path = next((p for p in layout.flax_candidates(key) if p in flat_target), None)
        if path is None:
            unexpected.append(key)
            continue
        want = tuple(flat_target[path].shape)
        got = layout.flax_shape(path, tuple(ref.shape))
        if got != want:
            misshaped.append(f"{key}: checkpoint {tuple(ref.shape)}, model expects {layout.torch_shape(path, want)}")
            misshaped_paths.add(path)
            continue
        plan[path] = (key, ref)
    missing = ["/".join(p) for p in flat_target if p not in plan and p not in misshaped_paths]
    if missing or unexpected or misshaped:
        raise mismatch_error(f"{name}: the weights do not fit the model", missing, unexpected, misshaped)
    place = place or _default_place
    out = {}
    for path, (key, ref) in plan.items():
        raw = _as_numpy(ref.read())
        if raw.shape != tuple(ref.shape):
            raise WeightsError(f"{name}: tensor {key!r} reads as {raw.shape}, its header says {tuple(ref.shape)}")
        arr = layout.to_flax(path, raw)
        out[path] = place(path, np.ascontiguousarray(arr), flat_target[path])
    return traverse_util.unflatten_dict(out)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            return x.view(dtype=_torch_int16(x)).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _torch_int16(x: Any) -> Any:
    import torch  # only reached with a torch tensor in hand

    return torch.int16


def _default_place(path: Path, arr: np.ndarray, like: Any) -> jax.Array:
    return jnp.asarray(arr, dtype=like.dtype)


def state_dict_source(state_dict: Mapping[str, Any]) -> dict[str, TensorRef]:
    """In-memory state dict (torch tensors or numpy arrays) → `TensorRef`s."""
    return {k: TensorRef(tuple(v.shape), (lambda v=v: _as_numpy(v))) for k, v in state_dict.items()}
