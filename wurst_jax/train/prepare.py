"""`wurst-jax prepare-data SRC OUT --effnet DIR`: a folder of captioned images → the `.npz` shards that
`wurst-jax train` fine-tunes Stage C (and, with `--images`, Stage B or A) on.

SRC holds images (.png, .jpg, .jpeg, .webp, .bmp; subfolders included) with their captions either in a
`metadata.jsonl` (one JSON object per line with `file_name`, relative to SRC, and the caption under `text`, as
Hugging Face's `imagefolder` reads it) or, without one, in a `.txt` file beside each image (`cat.png` +
`cat.txt`). Each image is turned upright (EXIF orientation), resized so its shorter side is `resolution`
(antialiased bilinear) and centre-cropped to `resolution`², as diffusers' Würstchen training scripts do. The
EfficientNet semantic encoder (`--effnet`: a folder `load_component` reads, e.g. one converted from Würstchen v2's
`model_v2_stage_b.pt` with `wurst-jax convert ... --stage effnet`) sees the crop at 32 · ceil(resolution / 42.67)
pixels — 768² for 1024², the 3/4 scale the original training used — and gives the `image_embeddings` on the
prior's grid (24 × 24 at 1024², what `WuerstchenPriorPipeline` outputs for that size). The encoder runs
data-parallel over all of this process's devices (`batch_size` is rounded up to a multiple of their number).

OUT receives `shard-00000.npz`, … (`shard_size` samples each: `captions`, `image_embeddings` float32
[N, g, g, 16] and, with `images`, the uint8 crops [N, R, R, 3]) and `wurst_jax_data.json` (what was made from
what). It is written into a temporary folder and renamed into place when complete, so a failure or Ctrl-C
leaves no OUT behind and an existing one untouched. Bad input — an image without a caption, a file that is not
an image, a broken metadata line, an encoder folder that is not an EfficientNet — stops the run with one error
naming the file, and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from wurst_jax.images import load_image
from wurst_jax.models import EfficientNetEncoder
from wurst_jax.models.effnet import DOWNSCALE, encode
from wurst_jax.output_dir import check_destination, check_interrupted, run_writer, staged_folder
from wurst_jax.sharding import DATA, make_mesh
from wurst_jax.weights import WeightsError, load_component, read_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
MANIFEST = "wurst_jax_data.json"
MAX_RESOLUTION = 8192  # crop side; 8× v2's training size, and a guard against allocating tens of GB per image
RESOLUTION_MULTIPLE = 42.67  # pixels per prior latent (diffusers' `resolution_multiple` for Würstchen v2)


def effnet_size(resolution: int) -> int:
    """The side the encoder sees: its stride × the prior's grid, `ceil(resolution / 42.67)` (1024 → 768 → 24)."""
    return DOWNSCALE * math.ceil(resolution / RESOLUTION_MULTIPLE)


def list_samples(src: str | os.PathLike, caption_column: str = "text") -> list[tuple[Path, str]]:
    """(image path, caption) pairs of SRC, sorted by path; raises ValueError naming what is missing or broken."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: not a folder (expected images with captions)")
    if (src / METADATA).is_file():
        return _from_metadata(src, caption_column)
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) and no {METADATA}")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(src)) for p in missing[:5])
        raise ValueError(
            f"{src}: {len(missing)} of {len(images)} images have no caption file beside them ({shown}"
            f"{', …' if len(missing) > 5 else ''}); give each image a .txt of the same name, or write a {METADATA}"
        )
    return [(p, _text(p.with_suffix(".txt")).strip()) for p in images]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8 (byte {e.start})") from None


def _from_metadata(src: Path, column: str) -> list[tuple[Path, str]]:
    path, samples = src / METADATA, []
    root = src.resolve()
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a 'file_name' string")
        caption = row.get(column)
        if not isinstance(caption, str):
            have = sorted(row)
            raise ValueError(f"{path}, line {n}: no caption string under {column!r} (has {have}; see --caption-column)")
        image = src / row["file_name"]
        if Path(row["file_name"]).is_absolute() or not image.resolve().is_relative_to(root):
            raise ValueError(
                f"{path}, line {n}: file_name {row['file_name']!r} points outside {src} (expected a path inside SRC)"
            )
        if not image.is_file():
            raise ValueError(f"{path}, line {n}: {row['file_name']!r} does not exist in {src}")
        samples.append((image, caption.strip()))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def make_encoder(module: Any, variables: Any, resolution: int) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 crops [B, R, R, 3] → float32 semantic latents [B, g, g, C]: `effnet.encode` jitted once, data-parallel
    over this process's devices (B must divide over them; the weights are replicated)."""
    side = effnet_size(resolution)
    mesh = make_mesh(data=-1, devices=jax.local_devices())
    batch, replicated = NamedSharding(mesh, PartitionSpec(DATA)), NamedSharding(mesh, PartitionSpec())
    run = jax.jit(
        lambda variables, images: encode(module, variables, images, side),
        in_shardings=(replicated, batch),
        out_shardings=batch,
    )
    variables = jax.device_put(variables, replicated)
    return lambda images: np.asarray(run(variables, images))


def prepare_data(
    src: str | os.PathLike,
    out: str | os.PathLike,
    effnet: str | os.PathLike | tuple[Any, Any],
    resolution: int = 1024,
    images: bool = False,
    shard_size: int = 1000,
    batch_size: int = 16,
    dtype: str = "float32",
    caption_column: str = "text",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the shards of SRC into OUT (see the module docstring); `effnet` is a folder or (module, variables)."""
    src, out = Path(src), Path(out)
    limits = (
        ("resolution", resolution, 32, MAX_RESOLUTION),
        ("shard_size", shard_size, 1, 10**7),
        ("batch_size", batch_size, 1, 10**5),
    )
    for name, value, low, high in limits:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected an integer from {low} to {high}")
    check_destination(src, out, overwrite)
    samples = list_samples(src, caption_column)
    module, variables = _load_effnet(effnet, dtype)
    encode = make_encoder(module, variables, resolution)
    batch_size = -(-batch_size // jax.local_device_count()) * jax.local_device_count()  # divides over the devices
    say = (lambda m: print(f"prepare-data: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    t0, shards, grid = time.perf_counter(), [], None
    workers = min(8, os.cpu_count() or 1)  # image decoding and resizing release the GIL
    with staged_folder(out, overwrite) as tmp, _image_pool(workers) as pool:
        for start in range(0, len(samples), shard_size):
            check_interrupted()  # a safe point: a Ctrl-C whose KeyboardInterrupt a callback swallowed stops here
            part = samples[start : start + shard_size]
            crops = np.stack(list(pool.map(lambda s: load_image(s[0], resolution), part)))
            embeddings = _encode_batches(encode, crops, batch_size)
            grid = embeddings.shape[1:3]
            arrays = {"captions": np.array([c for _, c in part], dtype=str), "image_embeddings": embeddings}
            if images:
                arrays["images"] = crops
            name = f"shard-{len(shards):05d}.npz"
            np.savez(tmp / name, **arrays)
            shards.append({"file": name, "samples": len(part)})
            done = start + len(part)
            say(f"{done}/{len(samples)} images, {done / (time.perf_counter() - t0):.1f} img/s")
        manifest = {
            "source": str(src.resolve()),
            "samples": len(samples),
            "resolution": resolution,
            "image_embeddings": [*grid, int(embeddings.shape[-1])],
            "images": images,
            "effnet": str(Path(effnet).resolve()) if isinstance(effnet, (str, os.PathLike)) else None,
            "dtype": dtype,
            "shards": shards,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"wrote {out}: {len(samples)} samples in {len(shards)} shards, embeddings {grid[0]}×{grid[1]}")
    return out


@contextlib.contextmanager
def _image_pool(workers: int) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads that decode images; on an error or Ctrl-C the queued images are dropped and the running ones
    awaited, so no worker still decodes into freed memory when the process ends (and Ctrl-C does not wait for the
    rest of the shard)."""
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _encode_batches(encode: Callable, crops: np.ndarray, batch_size: int) -> np.ndarray:
    """Encode in fixed-size batches (the last one padded) so one compiled program serves every batch."""
    out = []
    for i in range(0, len(crops), batch_size):
        batch = crops[i : i + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        out.append(encode(batch)[: batch_size - pad])
    return np.concatenate(out)


def _load_effnet(effnet: Any, dtype: str) -> tuple[Any, Any]:
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if isinstance(effnet, tuple):
        module, variables = effnet
        if not isinstance(module, EfficientNetEncoder):
            raise TypeError(f"effnet must be an EfficientNetEncoder, got {type(module).__name__}")
        return module.clone(dtype=dtypes[dtype]), variables
    kind, _ = read_config(effnet)  # before any weights are read
    if kind != "effnet":
        raise WeightsError(
            f"{effnet}: a {kind} folder, not the EfficientNet encoder (convert one with "
            "`wurst-jax convert model_v2_stage_b.pt DIR --stage effnet`)"
        )
    return load_component(effnet, dtype=dtypes[dtype], param_dtype=jnp.float32)


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="turn a folder of captioned images into the .npz shards `wurst-jax train` fine-tunes on",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="folder of images with .txt captions beside them, or a metadata.jsonl")
    p.add_argument("out", metavar="OUT", help="output folder of shards (written whole or not at all)")
    p.add_argument("--effnet", required=True, metavar="DIR", help="EfficientNet folder (convert ... --stage effnet)")
    p.add_argument("--resolution", type=int, default=1024, help="square crop size in pixels (1024)")
    p.add_argument("--images", action="store_true", help="also store the crops (needed to fine-tune stage b or a)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per .npz shard (1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call, over all devices (16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="encoder compute (float32)")
    p.add_argument("--caption-column", default="text", help="the caption key of metadata.jsonl rows (text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_prepare(args: argparse.Namespace) -> int:
    """Run a parsed `prepare-data` command: 0 on success, 2 for bad input, 130 when interrupted."""
    return run_writer(
        "prepare-data",
        args.out,
        lambda: prepare_data(
            args.src,
            args.out,
            args.effnet,
            resolution=args.resolution,
            images=args.images,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            dtype=args.dtype,
            caption_column=args.caption_column,
            overwrite=args.overwrite,
            progress=not args.quiet,
        ),
    )
