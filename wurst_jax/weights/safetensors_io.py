"""Lazy, validating reader for safetensors files (single or sharded with `*.safetensors.index.json`).

The header is parsed and checked up front (JSON, dtypes, byte ranges inside the file) so a truncated or
corrupt file fails before any tensor is converted; tensors are then memory-mapped and read one at a time,
which keeps peak memory at about one tensor beyond the converted tree. bfloat16 comes through `ml_dtypes`,
which the numpy backend of the `safetensors` package cannot represent.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from wurst_jax.weights.errors import WeightsError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)` → numpy array (a copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path}: not a safetensors file (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightsError(f"{self.path}: corrupt or truncated safetensors header (length {n}, file {size} B)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries = {}
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(
                    f"{self.path}: tensor {key!r} has an unsupported or malformed entry {info}"
                ) from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - start != nbytes or start < 0:
                raise WeightsError(
                    f"{self.path}: tensor {key!r} spans {end - start} B but shape {shape} needs {nbytes}"
                )
            if self._base + end > size:
                raise WeightsError(
                    f"{self.path}: truncated file: tensor {key!r} ends at byte {self._base + end}, file has {size}"
                )
            self._entries[key] = (dtype, shape, start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._entries[key][0])

    def get(self, key: str) -> np.ndarray:
        dtype, shape, start = self._entries[key]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        mm = np.memmap(self.path, dtype=dtype, mode="r", offset=self._base + start, shape=shape)
        return np.array(mm)


def weight_files(folder: Path, stem: str) -> list[Path]:
    """A component's safetensors files: `stem.safetensors`, or the shards named by `stem.safetensors.index.json`."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightsError(f"{index}: lists shards that are not in {folder}: {missing}")
        return [folder / s for s in shards]
    raise WeightsError(f"{folder}: no weights found (expected {single.name} or {index.name})")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, SafetensorsFile]]:
    """(key, file) for every tensor of every file; all headers are validated before the first is yielded."""
    opened = [SafetensorsFile(p) for p in files]
    seen: dict[str, Path] = {}
    for f in opened:
        for k in f.keys():
            if k in seen:
                raise WeightsError(f"tensor {k!r} appears in both {seen[k]} and {f.path}")
            seen[k] = f.path
    for f in opened:
        for k in f.keys():
            yield k, f
