"""The one rule between PyTorch state-dict names and layouts and Flax variable paths and layouts, both ways.

Names: a diffusers / transformers key becomes a Flax path by joining a list index to the module name before it
(`blocks.3.attention.to_q.weight` ↔ `params/blocks_3/attention/to_q/kernel`); `weight` lands on `kernel`,
`scale` (norms) or `embedding` (embeddings), whichever the module has; BatchNorm running statistics live in
`batch_stats` (`running_mean` ↔ `mean`, `running_var` ↔ `var`). Layouts: a 4-D `kernel` is OIHW ↔ HWIO
(ConvTranspose's [in, out, kh, kw] takes the same permutation and is used with `transpose_kernel=True`), a 2-D
`kernel` is transposed, everything else is copied.
"""

from __future__ import annotations

import re

import numpy as np

Path = tuple[str, ...]

_LEAF_CANDIDATES = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}
_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_STATS = {"running_mean": "mean", "running_var": "var"}
_TO_TORCH_STATS = {v: k for k, v in _STATS.items()}
_INDEX_SUFFIX = re.compile(r"((?:_\d+)+)$")
# (rank, flax axes from torch axes, torch axes from flax axes) for `kernel` leaves
_KERNEL_PERMS = {4: ((2, 3, 1, 0), (3, 2, 0, 1)), 2: ((1, 0), (1, 0))}


def flax_candidates(key: str) -> list[Path]:
    """The Flax variable paths a diffusers key may land on (the target tree decides which exists)."""
    *mods, leaf = key.split(".")
    path: list[str] = []
    for m in mods:
        if m.isdigit() and path:
            path[-1] += f"_{m}"
        else:
            path.append(m)
    if leaf in _STATS:
        return [("batch_stats", *path, _STATS[leaf])]
    return [("params", *path, name) for name in _LEAF_CANDIDATES.get(leaf, (leaf,))]


def torch_key(path: Path) -> str | None:
    """A Flax variable path → its PyTorch state-dict key (every `_<n>` suffix of a module name was a list index);
    None when the path has no PyTorch name (checked by mapping the key forward again)."""
    collection, *mods, leaf = path
    parts = []
    for m in mods:
        match = _INDEX_SUFFIX.search(m)
        if match:
            parts.append(m[: match.start()])
            parts += match.group(1)[1:].split("_")
        else:
            parts.append(m)
    name = {"params": _TO_TORCH_LEAF.get(leaf, leaf), "batch_stats": _TO_TORCH_STATS.get(leaf)}.get(collection)
    if name is None:
        return None
    key = ".".join([*parts, name])
    return key if path in flax_candidates(key) else None


def _perm(path: Path, ndim: int, direction: int) -> tuple[int, ...] | None:
    return _KERNEL_PERMS[ndim][direction] if path[-1] == "kernel" and ndim in _KERNEL_PERMS else None


def to_flax(path: Path, x: np.ndarray) -> np.ndarray:
    """A PyTorch tensor (numpy) → the layout of the Flax leaf at `path`."""
    perm = _perm(path, x.ndim, 0)
    return x if perm is None else x.transpose(perm)


def to_torch(path: Path, x: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax`."""
    perm = _perm(path, x.ndim, 1)
    return x if perm is None else x.transpose(perm)


def flax_shape(path: Path, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = _perm(path, len(torch_shape), 0)
    return tuple(torch_shape) if perm is None else tuple(torch_shape[p] for p in perm)


def torch_shape(path: Path, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = _perm(path, len(flax_shape), 1)
    return tuple(flax_shape) if perm is None else tuple(flax_shape[p] for p in perm)
