"""Score images against their prompts with no learned model, from the procedural ground truth's vocabulary.

Per image [H, W, 3] (uint8, or float in [0, 1]):
  1. background = the median of the border pixels, named by the nearest entry of `COLOURS`;
  2. foreground = pixels far from that background, split into 8-connected components (a numpy label propagation;
     scipy is not a dependency); components under a quarter of the largest one's area are ignored as specks;
  3. colour = the nearest named colour of the median of the foreground's core pixels (edges are antialiased
     mixtures, so only pixels well past the rough foreground threshold count);
  4. shape = per component, the template (circle, square at 0–85°, point-up triangle at 0–115°, all of the
     component's area and centroid) with the highest soft IoU against the antialiased coverage, voted across
     components by area. Templates make the decision rotation-invariant with no hand-tuned fill-ratio thresholds;
  5. count = the number of components.
A colour farther than `_MAX_COLOUR_DIST` from every named colour is named None, so a flat grey image fails all
three checks. Targets are `Scene`s or captions, parsed back by `parse_caption`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from wurst_jax.tiny.data import COLOURS, POSITIONS, SHAPES, Scene

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[k] for k in _NAMES], np.float32)  # [K, 3]
_MAX_COLOUR_DIST = 100.0  # in 0..255 RGB units; nearest named colour must lie within this
_FG_DIST = 60.0  # first-pass foreground threshold (named colours are ≥ 170 apart)
_MIN_AREA_FRAC = 0.002  # a foreground smaller than this fraction of the image counts as empty
_SPECK_FRAC = 0.25
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


@dataclasses.dataclass(frozen=True)
class Target:
    """What a caption asks for; the same attribute names as `Scene`. `position` is None when not stated."""

    colour: str
    shape: str
    background: str
    count: int = 1
    position: str | None = None


def parse_caption(caption: str) -> Target:
    """Caption → Target: the colour word right before the shape word is the foreground, the other the background."""
    words = re.findall(r"[a-z]+", caption.lower())
    shape_at = [i for i, w in enumerate(words) if w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES)]
    if len(shape_at) != 1 or shape_at[0] == 0 or words[shape_at[0] - 1] not in COLOURS:
        raise ValueError(f"cannot parse caption {caption!r}: need exactly one '<colour> <shape>'")
    i = shape_at[0]
    colours = [j for j, w in enumerate(words) if w in COLOURS and j != i - 1]
    if len(colours) != 1:
        raise ValueError(f"cannot parse caption {caption!r}: need exactly one background colour")
    count = _NUMBERS.get(words[i - 2], 1) if i >= 2 else 1
    positions = [w for w in words if w in POSITIONS]
    return Target(
        colour=words[i - 1],
        shape=words[i].removesuffix("s") if words[i] not in SHAPES else words[i],
        background=words[colours[0]],
        count=count,
        position=positions[0] if positions else None,
    )


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 × 3 binary dilation of [H, W]."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    return np.logical_or.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _to_rgb255(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    return np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0


def _name(rgb: np.ndarray) -> str | None:
    d = np.linalg.norm(_PALETTE - rgb, axis=-1)
    k = int(np.argmin(d))
    return _NAMES[k] if d[k] <= _MAX_COLOUR_DIST else None


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask [H, W] → (labels [H, W] int32 with -1 for background, count)."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    flat_idx = np.flatnonzero(mask)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        new = np.where(mask, nb, big)
        # Pointer jumping: a label is a pixel index, so follow it to that pixel's label (far fewer rounds).
        flat = new.ravel()
        flat[flat_idx] = flat[flat[flat_idx]]
        if np.array_equal(new, lab):
            break
        lab = new
    roots, inverse = np.unique(lab[mask], return_inverse=True)
    out = np.full((h, w), -1, np.int32)
    out[mask] = inverse
    return out, len(roots)


def _template_iou(ys: np.ndarray, xs: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
    """Best soft IoU of coverage `alpha` [h, w] (centred coords ys, xs) with each shape's template of equal area.

    Templates are antialiased like the coverage (4 × 4 samples per pixel): that decides small shapes (~8 px) too.
    """
    off = ((np.arange(4) - 1.5) / 4).astype(np.float32)
    ys = ys[None, None] + off[:, None, None, None]  # [4, 1, h, w]
    xs = xs[None, None] + off[None, :, None, None]  # [1, 4, h, w]
    area = float(alpha.sum())
    scores = {"circle": _iou(alpha, ys**2 + xs**2 <= area / np.pi)}
    half = np.sqrt(area) / 2  # square of side sqrt(A)
    t = np.deg2rad(np.arange(0, 90, 5, dtype=np.float32))[:, None, None, None, None]
    u, v = np.cos(t) * xs + np.sin(t) * ys, -np.sin(t) * xs + np.cos(t) * ys  # [R, 4, 4, h, w]
    scores["square"] = _iou(alpha, (np.abs(u) <= half) & (np.abs(v) <= half)).max()
    r_in = np.sqrt(area / np.sqrt(3)) / np.sqrt(3)  # inradius of the equilateral triangle of area A
    inside = True
    for j in range(3):
        t = np.deg2rad(np.arange(0, 120, 5, dtype=np.float32))[:, None, None, None, None] + np.float32(
            np.pi / 2 + j * 2 * np.pi / 3
        )
        inside = inside & (np.cos(t) * xs + np.sin(t) * ys <= r_in)
    scores["triangle"] = _iou(alpha, inside).max()
    return {k: float(v) for k, v in scores.items()}


def _iou(alpha: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Soft IoU of coverage [h, w] with template samples [..., 4, 4, h, w] (averaged to coverage per pixel)."""
    template = samples.mean(axis=(-4, -3), dtype=np.float32)
    inter = np.minimum(alpha, template).sum(axis=(-2, -1))
    union = np.maximum(alpha, template).sum(axis=(-2, -1))
    return inter / (union + 1e-9)


def analyse(image: np.ndarray) -> dict[str, Any]:
    """Measured attributes of one image: {"colour", "shape", "background" (names or None), "count" (int)}."""
    rgb = _to_rgb255(image)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    result: dict[str, Any] = {"background": _name(bg_rgb), "colour": None, "shape": None, "count": 0}
    dist = np.linalg.norm(rgb - bg_rgb, axis=-1)
    rough = dist > _FG_DIST
    if rough.sum() < _MIN_AREA_FRAC * h * w:
        return result
    # Core pixels: past the midpoint between the rough threshold and the farthest foreground pixels.
    far = np.percentile(dist[rough], 95)
    fg_rgb = np.median(rgb[rough & (dist >= 0.5 * (far + _FG_DIST))], axis=0)
    result["colour"] = _name(fg_rgb)
    # Antialiased edges: a pixel is inside when more than half-way to the foreground colour (area-accurate).
    mask = dist > 0.5 * np.linalg.norm(fg_rgb - bg_rgb)
    labels, n = label(mask)
    if n == 0:
        return result
    areas = np.bincount(labels[mask], minlength=n)
    keep = [k for k in range(n) if areas[k] >= _SPECK_FRAC * areas.max()]
    # Coverage in [0, 1] along the background → foreground line: sub-pixel area from the antialiased edges.
    axis = fg_rgb - bg_rgb
    alpha = np.clip(((rgb - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0).astype(np.float32)
    votes = dict.fromkeys(SHAPES, 0.0)
    for k in keep:
        yy, xx = np.nonzero(labels == k)
        y0, y1, x0, x1 = yy.min(), yy.max() + 1, xx.min(), xx.max() + 1
        pad = max(2, (max(y1 - y0, x1 - x0) + 1) // 2)  # templates may reach beyond the component's box
        y0, x0, y1, x1 = max(0, y0 - pad), max(0, x0 - pad), min(h, y1 + pad), min(w, x1 + pad)
        own = _dilate(labels[y0:y1, x0:x1] == k)  # the component plus its antialiased rim, not its neighbours
        cover = np.where(own, alpha[y0:y1, x0:x1], 0.0)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        total = cover.sum()
        ys, xs = ys - (ys * cover).sum() / total, xs - (xs * cover).sum() / total
        scores = _template_iou(ys, xs, cover)
        votes[max(scores, key=scores.get)] += float(areas[k])
    result["shape"] = max(votes, key=votes.get)
    result["count"] = len(keep)
    return result


def check(image: np.ndarray, target: Scene | Target | str) -> dict[str, bool]:
    """Per-attribute correctness of one image: {"colour", "shape", "background", "count"} → bool."""
    if isinstance(target, str):
        target = parse_caption(target)
    got = analyse(image)
    ok = {
        "colour": got["colour"] == target.colour,
        "shape": got["shape"] == target.shape,
        "background": got["background"] == target.background,
        "count": got["count"] == target.count,
    }
    # An image that is all background has no foreground colour or shape, whatever the names happen to be.
    if got["count"] == 0:
        ok["colour"] = ok["shape"] = False
    return ok


def score(images: np.ndarray | Sequence[np.ndarray], targets: Sequence[Scene | Target | str]) -> dict[str, float]:
    """Accuracies over a batch [B, H, W, 3]: per attribute, plus "all" (colour, shape and background right) and "n"."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    rows = [check(im, t) for im, t in zip(images, targets, strict=True)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "shape", "background", "count")}
    out["all"] = float(np.mean([r["colour"] and r["shape"] and r["background"] for r in rows]))
    out["n"] = float(len(rows))
    return out
