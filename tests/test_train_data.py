"""The procedural captioned dataset (wurst_jax.tiny.data) and the model-free checker (wurst_jax.tiny.checker)."""

import dataclasses
import itertools

import numpy as np
import pytest

from wurst_jax.tiny import checker, data

REQUIRED_COLOURS = ("red", "green", "blue", "yellow", "white", "black")


def test_vocabulary():
    assert set(REQUIRED_COLOURS) <= set(data.COLOURS)
    assert data.SHAPES == ("circle", "square", "triangle")
    assert len(data.all_combinations()) == len(data.COLOURS) * 3 * (len(data.COLOURS) - 1)


def test_heldout_split_is_balanced_and_disjoint():
    train, held = set(data.train_combinations()), set(data.heldout_combinations())
    assert held == set(data.HELDOUT) and not train & held and train | held == set(data.all_combinations())
    assert 0.05 <= len(held) / len(data.all_combinations()) <= 0.2
    # Every pair inside a held-out triple still occurs in training (only the triple is new).
    for c, s, b in held:
        assert any(k[:2] == (c, s) for k in train)
        assert any((k[0], k[2]) == (c, b) for k in train)
        assert any(k[1:] == (s, b) for k in train)


def test_train_split_never_produces_heldout_and_covers_vocabulary():
    scenes = data.sample_scenes(np.random.default_rng(0), 5000, "train")
    combos = {s.combination for s in scenes}
    assert not combos & data.HELDOUT
    assert {s.colour for s in scenes} == set(data.COLOURS)
    assert {s.background for s in scenes} == set(data.COLOURS)
    assert {s.shape for s in scenes} == set(data.SHAPES)
    assert {s.count for s in scenes} == {1, 2, 3}
    assert {s.position for s in scenes} == set(data.POSITIONS)
    assert all(s.colour != s.background for s in scenes)
    held = data.sample_scenes(1, 500, "heldout")
    assert {s.combination for s in held} == data.HELDOUT


def test_scene_validation():
    with pytest.raises(ValueError):
        data.Scene("red", "circle", "red")
    with pytest.raises(ValueError):
        data.Scene("red", "hexagon", "blue")
    with pytest.raises(ValueError):
        data.Scene("red", "circle", "blue", count=4)


def test_captions():
    one = data.Scene("red", "circle", "blue", position="left")
    assert one.captions()[0] == "a red circle on a blue background"
    assert "a red circle at the left on a blue background" in one.captions()
    many = dataclasses.replace(one, count=2)
    assert many.captions()[0] == "two red circles on a blue background"
    # The template is drawn from an rng; every form occurs, the required one most often.
    scenes = data.sample_scenes(3, 2000, "all")
    caps = [s.caption() for s in scenes]
    assert caps == [s.caption() for s in scenes]
    first = np.mean([c == s.captions()[0] for c, s in zip(caps, scenes, strict=True)])
    assert 0.3 < first < 0.5
    used = {s.captions().index(c) for c, s in zip(caps, scenes, strict=True)}
    assert used == {0, 1, 2, 3}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_parse_caption_round_trip(count):
    for c, s, b in data.all_combinations():
        for position in data.POSITIONS:
            scene = data.Scene(c, s, b, count=count, position=position)
            for caption in scene.captions():
                t = checker.parse_caption(caption)
                assert (t.colour, t.shape, t.background, t.count) == (c, s, b, count), caption
                assert t.position == (position if "at the" in caption else None), caption
    with pytest.raises(ValueError):
        checker.parse_caption("a photo of a cat")


def test_render_shape_dtype_and_determinism():
    scene = data.Scene("yellow", "triangle", "black", count=3, position="top", size=0.4, seed=7)
    for size in (32, 64):
        img = data.render(scene, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, data.render(scene, size))
    np.testing.assert_array_equal(data.render(scene, 64, noise=3.0), data.render(scene, 64, noise=3.0))
    assert not np.array_equal(data.render(scene), data.render(dataclasses.replace(scene, seed=8)))
    # Antialiased: edge pixels take intermediate values, not only the two flat colours.
    assert len(np.unique(data.render(data.Scene("white", "circle", "black")).reshape(-1, 3), axis=0)) > 4


def test_batches_deterministic():
    a, b = data.batches(5, 8, size=32), data.batches(5, 8, size=32)
    for _ in range(2):
        x, y = next(a), next(b)
        assert x["images"].shape == (8, 32, 32, 3) and x["images"].dtype == np.float32
        assert 0.0 <= x["images"].min() and x["images"].max() <= 1.0
        np.testing.assert_array_equal(x["images"], y["images"])
        assert x["captions"] == y["captions"] and x["scenes"] == y["scenes"]
        assert len(x["captions"]) == len(x["scenes"]) == 8
    assert next(data.batches(6, 8, size=32))["captions"] != next(data.batches(5, 8, size=32))["captions"]
    held = next(data.batches(0, 64, size=16, split="heldout"))
    assert all(s.combination in data.HELDOUT for s in held["scenes"])


@pytest.mark.parametrize("size,noise", [(64, 0.0), (32, 4.0)])
def test_checker_accurate_on_ground_truth(size, noise):
    scenes = data.sample_scenes(11, 300, "all")
    images = np.stack([data.render(s, size, noise) for s in scenes])
    acc = checker.score(images, scenes)
    assert acc["colour"] >= 0.99 and acc["background"] >= 0.99 and acc["shape"] >= 0.97, acc
    assert acc["count"] >= 0.97, acc
    # Float images in [0, 1] and captions as targets work the same.
    captions = [s.caption() for s in scenes[:50]]
    assert checker.score(images[:50].astype(np.float32) / 255, captions)["all"] >= 0.97


def test_checker_rejects_mismatches():
    rng = np.random.default_rng(0)
    for scene in data.sample_scenes(rng, 40, "all"):
        img = data.render(scene, 64)
        assert all(checker.check(img, scene).values())
        others = [c for c in data.COLOURS if c not in (scene.colour, scene.background)]
        wrong_colour = dataclasses.replace(scene, colour=str(rng.choice(others)))
        wrong_shape = dataclasses.replace(scene, shape=str(rng.choice([s for s in data.SHAPES if s != scene.shape])))
        wrong_bg = dataclasses.replace(scene, background=str(rng.choice(others)))
        assert checker.check(data.render(wrong_colour, 64), scene) == dict(
            colour=False, shape=True, background=True, count=True
        )
        assert not checker.check(data.render(wrong_shape, 64), scene)["shape"]
        assert not checker.check(data.render(wrong_bg, 64), scene)["background"]
    grey = np.full((64, 64, 3), 128, np.uint8)
    for c, s, b in itertools.islice(data.all_combinations(), 0, 90, 7):
        ok = checker.check(grey, data.Scene(c, s, b))
        assert not ok["colour"] and not ok["shape"] and not ok["background"]
        # A flat image of the right background colour has no foreground either.
        flat = np.broadcast_to(np.array(data.COLOURS[b], np.uint8), (64, 64, 3))
        assert checker.check(flat, data.Scene(c, s, b)) == dict(colour=False, shape=False, background=True, count=False)


def test_label_components():
    mask = np.zeros((9, 9), bool)
    mask[1:3, 1:3] = True
    mask[3, 3] = True  # diagonal neighbour: same component under 8-connectivity
    mask[6:8, 0:9] = True
    mask[0, 8] = True
    labels, n = checker.label(mask)
    assert n == 3
    assert labels[1, 1] == labels[3, 3] != labels[6, 4] != labels[0, 8]
    assert (labels[~mask] == -1).all() and (labels[mask] >= 0).all()
