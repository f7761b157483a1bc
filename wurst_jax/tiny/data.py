"""Procedural captioned dataset: coloured shapes on flat backgrounds, with ground truth for the checker.

A `Scene` is the ground truth (foreground colour, shape, background colour, count, position, size, render seed);
`render` draws it antialiased (at 4× then BOX-downsampled) into uint8 [H, W, 3]; `Scene.caption` words it with
one of a few templates, the required one being "a {colour} {shape} on a {colour} background".

Generalisation split: `HELDOUT` is a fixed set of 12 of the 6 × 3 × 5 = 90 (colour, shape, background)
combinations that the train split never produces. It is balanced (each colour held out twice as foreground and
twice as background, each shape four times) and every (colour, shape), (colour, background) and
(shape, background) pair it contains still occurs in training with the third attribute changed.

Pure numpy + PIL; no jax.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}

# (colour, shape, background) never seen in training; see the module docstring for how it was chosen.
HELDOUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "circle", "blue"),
        ("red", "triangle", "white"),
        ("green", "square", "black"),
        ("green", "circle", "red"),
        ("blue", "triangle", "yellow"),
        ("blue", "square", "green"),
        ("yellow", "circle", "white"),
        ("yellow", "square", "blue"),
        ("white", "triangle", "black"),
        ("white", "square", "red"),
        ("black", "circle", "yellow"),
        ("black", "triangle", "green"),
    }
)

# Caption templates; {p} only in positional ones. The first is the required form and the most frequent.
_TEMPLATES_ONE = (
    "a {c} {s} on a {b} background",
    "a {c} {s} at the {p} on a {b} background",
    "a {b} background with a {c} {s}",
    "{c} {s}, {b} background",
)
_TEMPLATES_MANY = (
    "{n} {c} {s}s on a {b} background",
    "{n} {c} {s}s at the {p} on a {b} background",
    "a {b} background with {n} {c} {s}s",
    "{n} {c} {s}s, {b} background",
)
_TEMPLATE_P = (0.4, 0.2, 0.2, 0.2)

# Object centres (x, y) as fractions of the image side; y grows downwards.
_ANCHORS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
_SIZE_RANGE = (0.3, 0.44)  # circumscribed-circle diameter of one object, fraction of the image side
_MARGIN = 0.05  # keeps a clean background border for the checker's background estimate
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Scene:
    """Ground truth of one image. `size` is an object's circumscribed-circle diameter as a fraction of the side."""

    colour: str
    shape: str
    background: str
    count: int = 1
    position: str = "center"
    size: float = 0.4
    seed: int = 0

    def __post_init__(self):
        if self.colour not in COLOURS or self.background not in COLOURS:
            raise ValueError(f"unknown colour in {self}")
        if self.colour == self.background:
            raise ValueError(f"foreground and background colours must differ: {self}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be 1, 2 or 3, got {self.count}")

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)

    def captions(self) -> tuple[str, ...]:
        """Every caption form of this scene, the required "a {colour} {shape} on a {colour} background" first."""
        templates = _TEMPLATES_ONE if self.count == 1 else _TEMPLATES_MANY
        words = dict(n=COUNT_WORDS[self.count], c=self.colour, s=self.shape, b=self.background, p=self.position)
        return tuple(t.format(**words) for t in templates)

    def caption(self, rng: np.random.Generator | int | None = None) -> str:
        """One caption, the template drawn from `rng` (default: seeded by the scene's own seed)."""
        rng = np.random.default_rng(self.seed if rng is None else rng)
        return self.captions()[rng.choice(len(_TEMPLATE_P), p=_TEMPLATE_P)]


def caption_words() -> frozenset[str]:
    """Every word the captions use (templates, colours, shapes and their plurals, positions, counts): the tiny
    model's whole vocabulary; other words give it nothing to go on."""
    text = " ".join(_TEMPLATES_ONE + _TEMPLATES_MANY).replace(",", " ")
    words = {w for w in text.split() if not w.startswith("{")}
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(POSITIONS) | set(COUNT_WORDS.values())
    return frozenset(words)


def all_combinations() -> tuple[tuple[str, str, str], ...]:
    """All 90 (colour, shape, background) triples with background != colour."""
    return tuple((c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b)


def train_combinations() -> tuple[tuple[str, str, str], ...]:
    return tuple(k for k in all_combinations() if k not in HELDOUT)


def heldout_combinations() -> tuple[tuple[str, str, str], ...]:
    return tuple(k for k in all_combinations() if k in HELDOUT)


_SPLITS = {"train": train_combinations, "heldout": heldout_combinations, "all": all_combinations}


def sample_scenes(rng: np.random.Generator | int, n: int, split: str = "train") -> list[Scene]:
    """`n` random scenes whose (colour, shape, background) lies in `split` ("train", "heldout" or "all")."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = np.random.default_rng(rng)
    combos = _SPLITS[split]()
    idx = rng.integers(len(combos), size=n)
    counts = rng.choice([1, 2, 3], size=n, p=[0.6, 0.25, 0.15])
    positions = rng.integers(len(POSITIONS), size=n)
    sizes = rng.uniform(*_SIZE_RANGE, size=n)
    seeds = rng.integers(2**31 - 1, size=n)
    return [
        Scene(*combos[i], count=int(k), position=POSITIONS[p], size=round(float(z), 4), seed=int(sd))
        for i, k, p, z, sd in zip(idx, counts, positions, sizes, seeds, strict=True)
    ]


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, diameter) per object, fractions of the side: a row (or a column at left/right) around the anchor."""
    ax, ay = _ANCHORS[scene.position]
    n = scene.count
    vertical = scene.position in ("left", "right")
    cell = (1 - 2 * _MARGIN) / n
    objects = []
    for i in range(n):
        d = scene.size * rng.uniform(0.92, 1.08)
        if n > 1:
            d = min(d, 0.7 * cell)  # with the jitter below, neighbours stay ≥ 0.2 cell apart
            along = _MARGIN + cell * (i + 0.5) + rng.uniform(-0.05, 0.05) * cell
            across = (ax if vertical else ay) + rng.uniform(-0.03, 0.03)
            cx, cy = (across, along) if vertical else (along, across)
        else:
            cx, cy = ax + rng.uniform(-0.04, 0.04), ay + rng.uniform(-0.04, 0.04)
        lo, hi = _MARGIN + d / 2, 1 - _MARGIN - d / 2
        objects.append((float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi)), float(d)))
    return objects


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square / point-up triangle with circumradius r, rotated by `angle` radians."""
    if shape == "square":
        thetas = angle + np.pi / 4 + np.arange(4) * np.pi / 2
    else:
        thetas = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in thetas]


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 10) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def render(scene: Scene, size: int = 64, noise: float = 0.0) -> np.ndarray:
    """The scene as uint8 [size, size, 3]; deterministic in (scene, size, noise). `noise`: Gaussian std in 0..255."""
    rng = np.random.default_rng(scene.seed)
    big = size * _SUPERSAMPLE
    bg = _jitter_colour(COLOURS[scene.background], rng)
    fg = _jitter_colour(COLOURS[scene.colour], rng)
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for cx, cy, d in _layout(scene, rng):
        cx, cy, r = cx * big, cy * big, d * big / 2
        angle = np.deg2rad(rng.uniform(-15, 15))
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r, angle), fill=fg)
    out = np.asarray(img.resize((size, size), Image.Resampling.BOX))
    if noise > 0:
        out = np.clip(out + rng.normal(0.0, noise, out.shape), 0, 255).astype(np.uint8)
    return out


def batches(
    seed: int, batch_size: int, size: int = 64, split: str = "train", noise: float = 0.0
) -> Iterator[dict[str, Any]]:
    """Infinite, seed-deterministic batches: {"images": float32 [B, size, size, 3] in [0, 1], "captions", "scenes"}."""
    rng = np.random.default_rng(seed)
    while True:
        scenes = sample_scenes(rng, batch_size, split)
        captions = [s.caption(rng) for s in scenes]
        images = np.stack([render(s, size, noise) for s in scenes]).astype(np.float32) / 255.0
        yield {"images": images, "captions": captions, "scenes": scenes}
