"""The component registry: every registered kind builds, exports, loads, converts and loads again from one
parametrised list, and the registry is the only place that names the component classes."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wurst_jax as wj
from wurst_jax.models import abstract_variables, param_count, registry
from wurst_jax.weights.sources import read_config

PACKAGE = Path(wj.__file__).parent
EXPORT = re.compile(r"""(__all__ = \[.*|\s*["']\w+["'],?\s*)""")  # `__all__` entries name classes, not kinds


def _random_variables(module, seed: int = 0):
    """Random values for every variable (BatchNorm variances positive), shaped by `abstract_variables`."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract_variables(module))
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        x = rng.standard_normal(leaf.shape).astype(np.float32) * 0.1
        if getattr(path[-1], "key", None) == "var":
            x = np.abs(x) + 0.5
        out.append(jnp.asarray(x, leaf.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def _shapes(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _assert_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", registry.kinds())
def test_every_kind_builds_exports_loads_and_converts(kind, tmp_path):
    spec = registry.get(kind)
    module = spec.build(spec.config.tiny())
    assert registry.for_module(module) is spec
    assert param_count(module) > 0
    variables = _random_variables(module)

    exported = wj.export_component(module, variables, tmp_path / "exported")
    assert (exported / f"{spec.weights_stem}.safetensors").is_file()
    assert read_config(exported) == (kind, module.config)
    loaded_module, loaded = wj.load_component(exported)
    assert loaded_module == module
    _assert_equal(loaded, variables)

    converted = wj.convert_checkpoint(exported, tmp_path / "converted")
    _, restored = wj.load_component(converted)
    _assert_equal(restored, variables)

    for stage in spec.stages:  # its original single files convert too (the tiny config given explicitly)
        weights = exported / f"{spec.weights_stem}.safetensors"
        if spec.stage_of is not None and spec.stage_of(_shapes(weights)) != stage:
            continue  # a kind with several roles (stage C / stage B): the tiny config is one of them
        single = wj.convert_checkpoint(
            weights,
            tmp_path / f"single_{stage}",
            stage=stage,
            config=str(exported / "config.json"),
        )
        _assert_equal(wj.load_component(single)[1], variables)


def test_the_registry_is_the_only_place_naming_component_classes():
    """No other file of the package spells a registered class name as a string (config.json `_class_name`s,
    transformers `architectures`): loading, conversion and export all ask the registry."""
    names = registry.class_names()
    pattern = re.compile("|".join(rf"[\"']{re.escape(n)}[\"']" for n in names))
    offenders = [
        f"{path.relative_to(PACKAGE)}:{i}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "registry.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not EXPORT.fullmatch(line)
    ]
    assert not offenders, offenders


def test_detection_names_the_kind_of_original_files():
    for spec in registry.specs():
        module = spec.build(spec.config.tiny())
        from wurst_jax.weights.export import torch_tensors

        keys = [k for k, *_ in torch_tensors(module, _random_variables(module))]
        found = registry.detect(keys)
        if spec.markers:
            assert found is not None and found[0] is spec, (spec.kind, found)
