"""Lazy, validating reader for safetensors files (single or sharded with `*.safetensors.index.json`).

Every file may be hostile, so each header is checked twice before any tensor is mapped: first here, strictly
(UTF-8 JSON without NaN/Infinity, duplicate keys or runaway nesting; known dtypes; shapes of non-negative
integers; byte ranges that match the shapes and lie inside the file), then by the `safetensors` package's own
parser, which also refuses overlapping or gapped byte ranges and uncovered bytes. Tensors are then
memory-mapped and read one at a time, which keeps peak memory at about one tensor beyond the converted tree.
bfloat16 comes through `ml_dtypes`, which the numpy backend of the `safetensors` package cannot represent.
The shards an index names must lie inside its folder. Every problem is one `WeightsError` naming the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

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
MAX_NDIM = 64  # numpy's limit: a tensor with more dimensions could not be read
_LIBRARY_HINTS = {  # what the safetensors parser's terse reasons mean for the user
    "invalid offset": "each tensor's data must begin where the previous tensor's ends: no overlaps, no gaps",
    "not fully covered": "the tensors must cover the data section exactly, with no bytes left over",
}


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: a hostile file's names and entries can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters (an error message is one line)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_file(path: Path) -> None:
    """Raise a `WeightsError` naming `path` unless it is a readable regular file (symlinks followed)."""
    try:
        path.stat()
    except OSError as e:  # ENOENT, ELOOP, EACCES, ...
        reason = "a symlink loop" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise WeightsError(f"{path}: cannot open it ({reason})") from None
    if not path.is_file():
        raise WeightsError(f"{path}: not a file")


class SafetensorsFile:
    """One safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)` → numpy array (a copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        require_file(self.path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{self.path}: not a safetensors file (only {size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise WeightsError(
                        f"{self.path}: corrupt or truncated safetensors header (length {n}, file {size} B)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read it ({e.strerror or e})") from None
        header = _parse_header(self.path, raw)
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise WeightsError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to strings)")
        self._base = 8 + n
        self._entries = {key: self._entry(key, info, size) for key, info in header.items()}
        _library_check(self.path)

    def _entry(self, key: str, info: Any, size: int) -> tuple[Any, tuple[int, ...], int]:
        """(dtype, shape, start) of one header entry, every field checked; raises naming the file and tensor."""
        problem = _entry_problem(info)
        if problem:
            raise WeightsError(
                f"{self.path}: tensor {short(key)} has an unsupported or malformed entry ({problem}): {short(info)}"
            )
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = info["data_offsets"]
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # exact: Python integers do not overflow
        if end - start != nbytes:
            raise WeightsError(
                f"{self.path}: tensor {short(key)} spans {end - start} B but shape {shape} needs {nbytes}"
            )
        if self._base + end > size:
            raise WeightsError(
                f"{self.path}: truncated file: tensor {short(key)} ends at byte {self._base + end}, file has {size}"
            )
        return dtype, shape, start

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._entries[key][0])

    def get(self, key: str) -> np.ndarray:
        dtype, shape, start = self._entries[key]
        if 0 in shape:  # no bytes to map (a scalar, shape (), has one element)
            return np.zeros(shape, dtype)
        try:
            mm = np.memmap(self.path, dtype=dtype, mode="r", offset=self._base + start, shape=math.prod(shape))
            return np.array(mm).reshape(shape)
        except (OSError, ValueError) as e:  # the file changed or vanished after its header was checked
            raise WeightsError(f"{self.path}: cannot read tensor {short(key)} ({e})") from None


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header's JSON object; strict where Python's `json` is lenient and the `safetensors` parser is not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: corrupt safetensors header (not UTF-8: byte {e.start} is invalid)") from None
    try:
        header = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise WeightsError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, the hooks' errors, integers with thousands of digits
        raise WeightsError(f"{path}: corrupt safetensors header ({clip(e)})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {short(dup)} appears twice")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_problem(info: Any) -> str:
    """What is wrong with one tensor's header entry ('' when nothing)."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        return "expected an object with dtype, shape and data_offsets"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"dtype {short(dtype, 40)} is not one of {', '.join(DTYPES)}"
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return "shape must be a list of non-negative integers"
    if len(shape) > MAX_NDIM:
        return f"{len(shape)} dimensions, at most {MAX_NDIM} are supported"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        return "data_offsets must be two integers [begin, end]"
    if not 0 <= offsets[0] <= offsets[1]:
        return "data_offsets must satisfy 0 <= begin <= end"
    return ""


def _library_check(path: Path) -> None:
    """Open `path` with the `safetensors` package, whose parser also checks that the tensors' byte ranges tile the
    data section (no overlaps, no gaps, nothing left over) and that no shape overflows; it maps no data."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        hint = next((h for k, h in _LIBRARY_HINTS.items() if k in reason), "")
        raise WeightsError(
            f"{path}: rejected by the safetensors parser: {clip(reason, 300)}" + (f"; {hint}" if hint else "")
        ) from None


def weight_files(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """A component's safetensors files: `stem.safetensors`, or the shards named by `stem.safetensors.index.json`;
    with a `variant` ("bf16"), diffusers' variant names `stem.bf16.safetensors` / `stem.safetensors.index.bf16.json`."""
    if variant is not None and (not variant or not variant.replace("_", "").isalnum()):
        raise ValueError(f"variant must be a word such as 'bf16' or 'fp16', got {variant!r}")
    tag = f".{variant}" if variant else ""
    single = folder / f"{stem}{tag}.safetensors"
    index = folder / f"{stem}.safetensors.index{tag}.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return _shards(folder, index)
    for path in (single, index):
        if path.is_symlink():  # is_file() is False for a dangling link and a symlink loop alike
            require_file(path)
    others = sorted(p.name for p in folder.glob(f"{stem}*.safetensors*") if p.name not in (single.name, index.name))
    hint = f"; it has {', '.join(others[:4])} (another --variant?)" if others else ""
    raise WeightsError(f"{folder}: no weights found (expected {single.name} or {index.name}){hint}")


def _shards(folder: Path, index: Path) -> list[Path]:
    """The shard files `index` names, each checked to be a file inside `folder`."""
    try:
        raw = json.loads(index.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except OSError as e:
        raise WeightsError(f"{index}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise WeightsError(f"{index}: not a valid safetensors index (not UTF-8: byte {e.start} is invalid)") from None
    except RecursionError:
        raise WeightsError(f"{index}: not a valid safetensors index (JSON nested too deeply)") from None
    except ValueError as e:
        raise WeightsError(f"{index}: not a valid safetensors index ({clip(e)})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(
            f'{index}: not a valid safetensors index (expected an object whose "weight_map" maps tensor names to '
            f"shard file names, got {short(weight_map if isinstance(raw, dict) else raw)})"
        )
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise WeightsError(
            f"{index}: not a valid safetensors index (weight_map[{short(bad)}] is {short(weight_map[bad])}, "
            "expected a shard file name)"
        )
    try:
        root = folder.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise WeightsError(f"{folder}: cannot resolve the folder ({e})") from None
    files, missing = [], []
    for name in sorted(set(weight_map.values())):
        path = _inside(root, folder, index, name)
        if path is None:
            missing.append(name)
        else:
            files.append(path)
    if missing:
        raise WeightsError(f"{index}: lists shards that are not in {folder}: {short(missing, 300)}")
    return files


def _inside(root: Path, folder: Path, index: Path, name: str) -> Path | None:
    """`folder / name`, refused unless it is (or links to) a file inside the folder; None when it does not exist.

    A link into a Hugging Face cache's `blobs/` is allowed: there every snapshot file is such a link, and the blob
    belongs to the same repository as the snapshot folder.
    """
    where = f"{index}: shard {short(name, 200)}"
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise WeightsError(f"{where} is outside {folder}; an index must name files inside its own folder")
    path = folder / rel
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        return None
    except RuntimeError:  # Python 3.11's pathlib reports a symlink loop this way
        raise WeightsError(f"{where} cannot be opened (a symlink loop)") from None
    except (OSError, ValueError) as e:  # ELOOP in later Pythons, EACCES, a NUL byte in the name
        reason = "a symlink loop" if getattr(e, "errno", None) == errno.ELOOP else clip(e)
        raise WeightsError(f"{where} cannot be opened ({reason})") from None
    hf_blob = real.parent.name == "blobs" and root.is_relative_to(real.parent.parent / "snapshots")
    if not (real.is_relative_to(root) or hf_blob):
        raise WeightsError(f"{where} links to {real}, outside {folder}; shards must lie inside the component folder")
    if not real.is_file():
        raise WeightsError(f"{where} is not a file")
    return path


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, SafetensorsFile]]:
    """(key, file) for every tensor of every file; all headers are validated before the first is yielded."""
    opened = [SafetensorsFile(p) for p in files]
    seen: dict[str, Path] = {}
    for f in opened:
        for k in f.keys():
            if k in seen:
                raise WeightsError(f"tensor {short(k)} appears in both {seen[k]} and {f.path}")
            seen[k] = f.path
    for f in opened:
        for k in f.keys():
            yield k, f
