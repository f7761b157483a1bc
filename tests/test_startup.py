"""Lean start-up: `import wurst_jax` imports no jax, flax, torch or transformers (its names load on first use), and
every public name resolves to the object its module defines."""

import importlib
import subprocess
import sys
from pathlib import Path

import wurst_jax as wj

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_lazy():
    code = "import sys, wurst_jax; "
    code += "print(sorted(m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_public_names_resolve():
    assert sorted(wj.__all__) == sorted(wj._WHERE) and set(wj.__all__) <= set(dir(wj))
    for name, module in wj._WHERE.items():
        assert getattr(wj, name) is getattr(importlib.import_module(module), name)
    from wurst_jax import WuerstchenPipeline, models  # `from` imports: names and subpackages

    assert WuerstchenPipeline is wj.WuerstchenPipeline and models.WuerstchenPrior is wj.WuerstchenPrior
    try:
        wj.NoSuchName  # noqa: B018
    except AttributeError as e:
        assert "NoSuchName" in str(e)
    else:
        raise AssertionError("unknown names must raise AttributeError")


def test_generate_path_never_imports_transformers_or_torch():
    """The shipped model loaded as `wurst-jax generate` loads it, in a process where torch cannot be imported:
    transformers (whose import prints "PyTorch was not found" there) and torch are never imported."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import wurst_jax as wj, wurst_jax.cli.generate\n"
        "from wurst_jax.serving.backend import TINY_MODEL as m\n"
        "wj.WuerstchenPipeline.from_pretrained(m / 'wuerstchen', m / 'wuerstchen-prior', progress=False)\n"
        "print(sorted(k for k in ('transformers', 'torch', 'orbax', 'optax') if sys.modules.get(k)))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]" and "PyTorch" not in p.stderr, p.stderr[-2000:]
