"""Image requests checked and planned: prompt files and HTTP fields → `ImageJob`s → fixed-size batches.

A prompt file is `.txt` (one prompt per line, blank lines skipped) or `.jsonl` (one object per line with the keys
in `FILE_KEYS`). Every line is checked before any weights load; a problem raises `ValueError("FILE:LINE: …")`.
Each image gets its own seed (a line's seed + k for its k-th image; a line without one gets `--seed` + the number
of images before it), so an image is the same whichever batch it falls in. `results.jsonl` in the output folder
lists the images already made; `load_results` reads it back for resuming.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from wurst_jax.serving.backend import ModelSpec, Row, Settings

FILE_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "height",
    "width",
    "num_images",
    "id",
    "prior_steps",
    "prior_guidance",
    "steps",
    "decoder_guidance",
)
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1
MAX_IMAGES_PER_LINE = 10000
RESULTS = "results.jsonl"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# what an image was made from: a listed image counts as done only if all of these equal the planned ones
MATCH_KEYS = ("prompt", "negative_prompt", "seed", "height", "width", "prior_steps", "prior_guidance", "steps")
MATCH_KEYS += ("decoder_guidance", "dtype", "variant", "model_digests")


def check_int(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{key}` must be an integer from {low} to {high}, got {value!r}")
    return value


def check_guidance(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{key}` must be a finite number ≥ 0, got {value!r}")
    return float(value)


def check_text(key: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not optional and not value.strip()):
        raise ValueError(f"`{key}` must be a {'string' if optional else 'non-empty string'}, got {value!r}")
    return value or None


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The values a line (or request) does not set: the command's options, else the model's defaults."""

    height: int
    width: int
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 1
    prior_steps: int | None = None
    prior_guidance: float = 4.0
    steps: int = 12
    decoder_guidance: float = 0.0

    @classmethod
    def for_model(cls, spec: ModelSpec, **overrides: Any) -> Defaults:
        """The model's own defaults: its size, decoder steps (v2 12, Stable Cascade 10) and decoder guidance."""
        own = dict(steps=spec.default_steps, decoder_guidance=spec.default_decoder_guidance)
        return cls(spec.default_size, spec.default_size, **{**own, **overrides})


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt's checked fields: `num_images` images from `seed` on (None: not given)."""

    prompt: str
    negative_prompt: str | None
    seed: int | None
    num_images: int
    settings: Settings


def check_request(fields: dict, defaults: Defaults, spec: ModelSpec, max_images: int = MAX_IMAGES_PER_LINE) -> Request:
    """Fields named as in a prompt file (`FILE_KEYS` but `id`) → a `Request`; ValueError names the bad key."""
    get = lambda key: fields.get(key, getattr(defaults, key))
    prompt = check_text("prompt", fields.get("prompt"))
    negative = check_text("negative_prompt", get("negative_prompt"), optional=True)
    n = check_int("num_images", get("num_images"), 1, max_images)
    seed = fields.get("seed")
    if seed is not None:
        check_int("seed", seed, 0, MAX_SEED - n + 1)
    height, width = check_int("height", get("height"), 1, 1 << 30), check_int("width", get("width"), 1, 1 << 30)
    spec.check_size(height, width)
    prior_steps = get("prior_steps")
    settings = Settings(
        height=height,
        width=width,
        prior_steps=None if prior_steps is None else check_int("prior_steps", prior_steps, 1, MAX_STEPS),
        prior_guidance=check_guidance("prior_guidance", get("prior_guidance")),
        steps=check_int("steps", get("steps"), 1, MAX_STEPS),
        decoder_guidance=check_guidance("decoder_guidance", get("decoder_guidance")),
    )
    return Request(prompt, negative, seed, n, settings)


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One image of a prompt file: its PNG name in the output folder, where it came from and what makes it."""

    file: str
    line: int
    index: int
    id: str | None
    row: Row
    settings: Settings

    def record(self) -> dict:
        """The results.jsonl fields that describe what was asked (the runner adds model, dtype and timings)."""
        s = self.settings
        return {
            "file": self.file,
            "id": self.id,
            "line": self.line,
            "index": self.index,
            "prompt": self.row.prompt,
            "negative_prompt": self.row.negative_prompt,
            "seed": self.row.seed,
            "height": s.height,
            "width": s.width,
            "prior_steps": s.prior_steps,
            "prior_guidance": s.prior_guidance,
            "steps": s.steps,
            "decoder_guidance": s.decoder_guidance,
        }


def _read_lines(path: Path) -> list[tuple[int, str]]:
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: expected a .txt (one prompt per line) or .jsonl prompt file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    out = []
    for i, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{i}: not UTF-8 text") from None
        if text.strip():
            out.append((i, text))
    return out


def _fields(path: Path, line: int, text: str) -> dict:
    if path.suffix == ".txt":
        return {"prompt": text.strip()}
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FILE_KEYS)}")
    if "prompt" not in fields:
        raise ValueError("missing `prompt`")
    return fields


def parse_prompt_file(path: str | os.PathLike, defaults: Defaults, spec: ModelSpec) -> list[ImageJob]:
    """Every image the file asks for, in file order; ValueError("FILE:LINE: …") on the first bad line."""
    path = Path(path)
    jobs: list[ImageJob] = []
    names: dict[str, int] = {}
    for line, text in _read_lines(path):
        try:
            fields = _fields(path, line, text)
            req = check_request(fields, defaults, spec)
            ident = fields.get("id")
            if ident is not None:
                if isinstance(ident, int) and not isinstance(ident, bool):
                    ident = str(ident)
                if not isinstance(ident, str) or not _ID.fullmatch(ident):
                    raise ValueError(f"`id` must be 1–100 letters, digits, '.', '_' or '-' (not first), got {ident!r}")
            seed = req.seed
            if seed is None:
                seed = defaults.seed + len(jobs)
                if seed + req.num_images - 1 > MAX_SEED:
                    raise ValueError(f"the default seed {seed} (--seed + images before this line) exceeds {MAX_SEED}")
            stem = ident if ident is not None else f"{line:05d}"
            for k in range(req.num_images):
                name = f"{stem}_{k}.png"
                if name in names:
                    raise ValueError(f"image name {name} is already used by line {names[name]}; give a unique `id`")
                names[name] = line
                row = Row(req.prompt, req.negative_prompt, seed + k)
                jobs.append(ImageJob(name, line, k, None if ident is None else ident, row, req.settings))
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    if not jobs:
        raise ValueError(f"{path}: no prompts")
    return jobs


def plan_batches(jobs: list[ImageJob], batch_size: int) -> list[tuple[Settings, list[ImageJob]]]:
    """Jobs grouped by settings (groups in order of first appearance, jobs in file order), cut into batches of
    at most `batch_size`; every process of a multi-host run computes the same plan from the same jobs."""
    groups: dict[Settings, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.settings, []).append(job)
    return [(s, g[i : i + batch_size]) for s, g in groups.items() for i in range(0, len(g), batch_size)]


def padded_rows(batch: list[ImageJob], batch_size: int) -> list[Row]:
    """The batch's rows, padded to `batch_size` by repeating its last real row (one compiled shape per group)."""
    return [j.row for j in batch] + [batch[-1].row] * (batch_size - len(batch))


def load_results(out_dir: Path) -> dict[str, dict]:
    """Listed images whose PNG is present, by file name. A truncated last line (a crash while appending) and
    lines whose PNG is gone are dropped, and the file is rewritten without them (atomically)."""
    path = out_dir / RESULTS
    if not path.is_file():
        return {}
    lines = path.read_bytes().split(b"\n")
    records: dict[str, dict] = {}
    dirty = False
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
                raise ValueError("not an image record")
        except ValueError as e:
            if i == len(lines):  # the last line, without its newline: cut short by a crash
                dirty = True
                continue
            raise ValueError(f"{path}:{i}: unreadable ({e}); move the file away to start the folder over") from None
        if (out_dir / rec["file"]).is_file():
            records[rec["file"]] = rec
        else:
            dirty = True
    if dirty or lines[-1].strip():  # also when the last line lacks its newline: the next append needs one
        tmp = path.with_name(f".{RESULTS}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return records


def _digests(model: Any) -> dict:
    """A model's identity: its folders' digests (not their paths, which may change between machines)."""
    return {k: v for k, v in model.items() if k.endswith("_digest")} if isinstance(model, dict) else {}


def done_mask(jobs: list[ImageJob], records: dict[str, dict], made_with: dict) -> list[bool]:
    """Which jobs are already made. A listed image made from other settings, another model or dtype is refused
    (rather than silently kept or overwritten)."""
    mask = []
    for job in jobs:
        rec = records.get(job.file)
        if rec is not None:
            want = {**job.record(), **made_with, "model_digests": _digests(made_with.get("model"))}
            have = {**rec, "model_digests": _digests(rec.get("model"))}
            diff = [k.replace("_digests", "") for k in MATCH_KEYS if have.get(k) != want.get(k)]
            if diff:
                raise ValueError(
                    f"{job.file} in the output folder was made with another {', '.join(diff)} (prompt file line "
                    f"{job.line}); use a new --out-dir, or delete {job.file} to make it again"
                )
        mask.append(rec is not None)
    return mask
