"""The `.npz` shards a fine-tune reads: what each stage needs from them (`shard_spec`), the checks every shard
passes before training starts (`check_shard`), and `Shards`, an endless shuffled stream of batches that is a
function of (seed, step) alone. The format is described in `wurst_jax.train.finetune`.
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What a stage needs from a shard: key → (number of dims with N, last-dim size or None, kind)."""

    arrays: dict[str, tuple[int, int | None, str]]
    multiple: int = 1  # H and W of `images` must be multiples of this


def shard_spec(stage: str, configs: dict[str, Any]) -> ShardSpec:
    """From the component configs (`read_config` of the init folders), before any weights are read."""
    if stage == "c":
        prior = configs["prior"]  # Würstchen v2's c_in, Stable Cascade's in_channels
        channels = getattr(prior, "c_in", None) or prior.in_channels
        return ShardSpec({"captions": (1, None, "U"), "image_embeddings": (4, channels, "f")})
    if stage == "c-controlnet":  # stage C's, plus the images the ControlNet's condition is made from
        arrays = {"captions": (1, None, "U"), "image_embeddings": (4, configs["prior"].in_channels, "f")}
        return ShardSpec({**arrays, "images": (4, 3, "u1")})
    vq = configs["vqgan"]
    factor = vq.up_down_scale_factor * 2 ** (vq.levels - 1)
    if stage == "a":
        return ShardSpec({"images": (4, 3, "u1")}, factor)
    dec = configs["decoder"]
    arrays = {"captions": (1, None, "U"), "images": (4, 3, "u1"), "image_embeddings": (4, dec.effnet_embd, "f")}
    return ShardSpec(arrays, factor * dec.downscale)


def _read_shard(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys if k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz shard without pickled objects ({e})") from None


def check_shard(path: Path, arrays: dict[str, np.ndarray], spec: ShardSpec) -> int:
    """Raise a ValueError naming `path` and what was expected; returns the shard's N."""
    want = ", ".join(f"{k} [N{', …' * (d - 1)}{f', {c}' if c else ''}]" for k, (d, c, _) in spec.arrays.items())
    missing = [k for k in spec.arrays if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing {missing}; a shard for this stage holds {want}")
    sizes = {}
    for key, (ndim, channels, kind) in spec.arrays.items():
        x = arrays[key]
        if x.ndim != ndim or (channels is not None and x.shape[-1] != channels):
            raise ValueError(
                f"{path}: {key} has shape {x.shape}, expected {ndim} dims"
                + (f" ending in {channels} channels (NHWC)" if channels else "")
            )
        if kind == "U" and x.dtype.kind != "U":
            raise ValueError(f"{path}: {key} has dtype {x.dtype}, expected strings (np.array(list_of_str))")
        if kind == "u1" and x.dtype != np.uint8:
            raise ValueError(f"{path}: {key} has dtype {x.dtype}, expected uint8 RGB in [0, 255]")
        if kind == "f":
            if x.dtype.kind != "f":
                raise ValueError(f"{path}: {key} has dtype {x.dtype}, expected a float array")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{path}: {key} holds {int(np.sum(~np.isfinite(x)))} non-finite values (NaN / inf)")
        if key == "images" and (x.shape[1] % spec.multiple or x.shape[2] % spec.multiple):
            raise ValueError(
                f"{path}: images are {x.shape[1]}×{x.shape[2]}; H and W must be multiples of {spec.multiple}"
            )
        sizes[key] = x.shape[0]
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"{path}: every array needs the same N > 0 samples; got {sizes}")
    return next(iter(sizes.values()))


class Shards:
    """The `.npz` shards of a folder, checked up front; `batch(k, ...)` is batch k of an endless shuffled stream."""

    def __init__(self, folder: str | Path, spec: ShardSpec, cache: int = 2):
        folder = Path(folder)
        self.files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
        if not self.files:
            raise ValueError(f"{folder}: no .npz shards (expected a folder of files holding {sorted(spec.arrays)})")
        self.keys, self.sizes, shapes = list(spec.arrays), [], {}
        for path in self.files:
            arrays = _read_shard(path, self.keys)
            self.sizes.append(check_shard(path, arrays, spec))
            for key in self.keys:
                first = shapes.setdefault(key, (path, arrays[key].shape[1:]))
                if key != "captions" and arrays[key].shape[1:] != first[1]:
                    raise ValueError(
                        f"{path}: {key} is {arrays[key].shape[1:]} per sample but {first[0].name} has {first[1]}; "
                        "all shards of a run share one resolution"
                    )
        self.total = sum(self.sizes)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_size = cache

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one Shards per run)
    def _epoch(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative end offsets in that order) of one epoch."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.files))
        return order, np.cumsum([self.sizes[i] for i in order])

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def _rows(self, seed: int, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, shard]).permutation(self.sizes[shard])

    def rows(self, k: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
        """(shard, row) of each sample of batch k."""
        out = []
        for p in range(k * batch_size, (k + 1) * batch_size):
            epoch, offset = divmod(p, self.total)
            order, ends = self._epoch(seed, epoch)
            j = int(np.searchsorted(ends, offset, side="right"))
            shard = int(order[j])
            out.append((shard, int(self._rows(seed, epoch, shard)[offset - (ends[j - 1] if j else 0)])))
        return out

    def _load(self, shard: int) -> dict:
        if shard not in self._cache:
            self._cache[shard] = _read_shard(self.files[shard], self.keys)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard]

    def batch(self, k: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """Batch k: {key: [batch_size, ...]}, images as float32 in [0, 1]."""
        picked = [(self._load(s), r) for s, r in self.rows(k, batch_size, seed)]
        out = {key: np.stack([a[key][r] for a, r in picked]) for key in self.keys}
        if "images" in out:
            out["images"] = out["images"].astype(np.float32) / 255.0
        if "image_embeddings" in out:
            out["image_embeddings"] = out["image_embeddings"].astype(np.float32)
        return out
