"""Warm starts (`wurst_jax.warm`): a compiled stage program and a module's abstract variables are kept in the
persistent cache folder and a later process uses them without tracing; keys name every input that changes them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src import compilation_cache

from wurst_jax import warm
from wurst_jax.models.wuerstchen import StageCConfig, WuerstchenPrior
from wurst_jax.pipelines import runtime

ROOT = Path(__file__).resolve().parent.parent

# a stage-like program (fusions, a dtype change, a static argument), run in fresh processes
PROGRAM = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from wurst_jax import warm
from wurst_jax.pipelines.runtime import CompileCache, enable_compilation_cache

SOURCE = '''
def program(w, x, *, scale):
    h = jnp.tanh(x @ w.astype(jnp.float32)) * scale
    return (jnp.exp(-h) + h.astype(jnp.bfloat16).astype(jnp.float32)).sum(-1)
'''

def define():  # a new function object each time: jax's in-memory caches do not know it; its program is the same
    space = dict(jnp=jnp, __name__="__main__")
    exec(SOURCE, space)
    return space["program"]

enable_compilation_cache(sys.argv[1])
w, x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(8, 6), np.ones((3, 8), np.float32)
w, x = jax.device_put((w, x), jax.devices()[-1])  # not the default device: the kept program runs where it was made
if sys.argv[2] == "first":  # jax's own cache gets the program first (as from an older wurst_jax run)
    jax.jit(define(), static_argnames="scale").lower(w, x, scale=2.0).compile()
program = define()
kept = warm.load_executable("p", program, {"scale": 2.0}, (w, x)) is not None
out = CompileCache()("p", program, {"scale": 2.0}, w, x)
print(kept, ",".join(f"{v:.6f}" for v in np.asarray(out)))
"""


def run(cache: Path, mode: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # the program sits on the second device
    code = textwrap.dedent(PROGRAM)
    p = subprocess.run([sys.executable, "-c", code, str(cache), mode], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


def test_a_later_process_runs_the_kept_program(tmp_path):
    """The first process compiles while jax's cache already holds the program (the kept copy must still be whole:
    a copy of jax's loaded executable is not); the second loads the kept executable, runs it, gets the same
    numbers."""
    cache = tmp_path / "cache"
    first = run(cache, "first")
    assert first.startswith("False ") and len(list((cache / "traced").glob("exe-*"))) == 1
    second = run(cache, "later")
    assert second == "True " + first.split(" ", 1)[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_CHOSEN", [False])
    runtime.enable_compilation_cache(tmp_path)
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def f(x, *, module):
    return x


def test_keys(cache_dir):
    static = {"module": WuerstchenPrior(StageCConfig.tiny())}
    x = jax.device_put(np.ones((2, 3), np.float32))
    key = warm._executable_path("prior", f, static, (x,))
    assert key is not None and key.parent == cache_dir / "traced"
    on = jax.device_put
    assert key == warm._executable_path("prior", f, static, (on(np.zeros((2, 3), np.float32)),))  # values do not count
    others = [
        warm._executable_path("prior", f, static, (on(np.ones((2, 4), np.float32)),)),  # shape
        warm._executable_path("prior", f, static, (on(np.ones((2, 3), np.int32)),)),  # dtype
        warm._executable_path("prior", f, static, ({"x": x},)),  # tree
        warm._executable_path("prior", f, {"module": static["module"].clone(scan_blocks=True)}, (x,)),  # static
        warm._executable_path("decoder", f, static, (x,)),  # name
    ]
    assert len({key, *others}) == 6
    assert warm._executable_path("prior", lambda x: x, {}, (x,)) is None  # a lambda: what it captures is unnamed
    assert warm._executable_path("prior", f, {"module": object()}, (x,)) is None  # an address in its repr
    assert warm._executable_path("prior", f, static, (np.ones((2, 3), np.float32),)) is None  # on no device yet

    def local(x):
        return x

    assert warm.describe(f) == f"{__name__}.f" and warm.describe(local) is None  # <locals>: captures unnamed


def test_abstract_variables_kept(cache_dir, monkeypatch):
    module = WuerstchenPrior(StageCConfig.tiny())
    first = warm.abstract_variables(module)
    assert len(list((cache_dir / "traced").glob("vars-*"))) == 1
    from wurst_jax import models

    monkeypatch.setattr(models, "abstract_variables", lambda *a, **k: pytest.fail("traced again"))
    again = warm.abstract_variables(module)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(first)
    assert jax.tree_util.tree_leaves(again) == jax.tree_util.tree_leaves(first)


def test_nothing_kept_without_a_cache_folder(tmp_path):
    assert jax.config.jax_compilation_cache_dir is None  # conftest: WURST_JAX_CACHE_DIR=off
    assert warm.folder() is None and warm._executable_path("p", np.sum, {}, (np.ones(2),)) is None
