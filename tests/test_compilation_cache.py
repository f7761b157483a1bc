"""The persistent compilation cache is on by default: the per-user folder ($WURST_JAX_CACHE_DIR, else
$XDG_CACHE_HOME or ~/.cache, /wurst_jax/jax), `--cache-dir` overrides it, `--no-cache` and WURST_JAX_CACHE_DIR=off turn
it off, the pipelines keep a folder the caller chose, and `wurst-jax generate` fills the default folder."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax._src import compilation_cache

from wurst_jax.pipelines import runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean(monkeypatch):
    """Leave jax's cache setting and the module's choice as they were."""
    monkeypatch.setattr(runtime, "_CHOSEN", [False])
    yield monkeypatch
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("WURST_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.default_cache_dir() == tmp_path / "xdg" / "wurst_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.default_cache_dir() == tmp_path / "home" / ".cache" / "wurst_jax" / "jax"
    monkeypatch.setenv("WURST_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.default_cache_dir() == tmp_path / "mine"
    for off in ("off", "", "0", "None"):
        monkeypatch.setenv("WURST_JAX_CACHE_DIR", off)
        assert runtime.default_cache_dir() is None


def test_flags(clean, tmp_path):
    assert runtime.use_compilation_cache(tmp_path / "flag", enabled=False) is None  # --no-cache wins over a folder
    assert jax.config.jax_compilation_cache_dir is None
    assert runtime.default_compilation_cache() is None  # the command chose "off": the pipelines keep it
    assert runtime.use_compilation_cache(tmp_path / "flag") == tmp_path / "flag"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag") and (tmp_path / "flag").is_dir()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError, match="--cache-dir"):  # an explicit folder that cannot be made: a clear error
        runtime.use_compilation_cache(blocked / "sub")


def test_pipelines_default(clean, tmp_path):
    clean.setenv("WURST_JAX_CACHE_DIR", str(tmp_path / "env"))
    assert runtime.default_compilation_cache() == tmp_path / "env"  # nobody chose: the per-user default
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    runtime.enable_compilation_cache(tmp_path / "caller")  # the caller's folder is kept
    assert runtime.default_compilation_cache() == tmp_path / "caller"
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(5))  # compiled after the switch: written to the new folder
    assert any((tmp_path / "caller").iterdir())


def test_generate_fills_default_cache(tmp_path):
    """`wurst-jax generate` with no cache flag writes its programs under $XDG_CACHE_HOME/wurst_jax/jax; its start-up
    imports none of torch, transformers, orbax, optax (python -X importtime lists every module imported)."""
    env = {k: v for k, v in os.environ.items() if k != "WURST_JAX_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-X", "importtime", "-m", "wurst_jax.cli", "generate", "a red circle"]
    cmd += ["--out", str(tmp_path / "a.png"), "--quiet", "--prior-steps", "2", "--steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "a.png").is_file()
    imported = {ln.split("|")[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
    assert "wurst_jax.pipelines.wuerstchen" in imported  # the listing is there
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "orbax", "optax")}
    assert len(list((tmp_path / "xdg" / "wurst_jax" / "jax").iterdir())) >= 3  # text, prior, decoder, vqgan, ...
