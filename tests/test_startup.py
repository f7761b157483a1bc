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
