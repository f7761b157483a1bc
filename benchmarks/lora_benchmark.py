"""LoRA vs full fine-tuning of the Stage C prior: trained-parameter + optimizer-state bytes and train-step time at
the same batch, on whatever device jax sees (CPU here), at a small config. Prints a table and appends it to
benchmarks/RESULTS.md.

    PYTHONPATH=. python benchmarks/lora_benchmark.py [--c 256 --depth 4 --batch 4 --size 8 --rank 8 --steps 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import wurst_jax as wj
from wurst_jax.lora.train import add_lora, is_lora, lora_loss
from wurst_jax.train import objectives
from wurst_jax.train.config import RunConfig
from wurst_jax.train.setup import build_train_setup


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype"))


def measure(name, loss, variables, run, trainable, batch, steps):
    setup = build_train_setup(loss, variables, run, trainable=trainable)
    state = setup.state
    t0 = time.perf_counter()
    state, m = setup.step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = setup.step(state, batch)
    jax.block_until_ready(m)
    step = (time.perf_counter() - t0) / steps
    return {
        "mode": name,
        "trained params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
        "trained+opt+ema MiB": (nbytes(state.params) + nbytes(state.opt_state) + nbytes(state.ema)) / 2**20,
        "frozen MiB": nbytes(state.frozen) / 2**20,
        "first step s": first,
        "step s": step,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--c", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    cfg = wj.StageCConfig(c_in=16, c=a.c, c_cond=a.c, c_r=64, depth=a.depth, nhead=a.c // 64, dropout=0.0)
    module = wj.WuerstchenPrior(cfg)
    rng = np.random.default_rng(0)
    batch = {
        "latents": rng.standard_normal((a.batch, a.size, a.size, 16)).astype(np.float32),
        "clip": rng.standard_normal((a.batch, 77, a.c)).astype(np.float32),
    }
    init = jax.jit(module.init)(jax.random.PRNGKey(0), batch["latents"], jnp.zeros(a.batch), batch["clip"])
    variables = {"params": nn.meta.unbox(init["params"])}  # plain arrays (init boxes them with logical axes)
    loss = objectives.component_loss("c", module, np.zeros((1, 77, a.c), np.float32), 0.0, "p2")
    run = RunConfig(steps=a.steps, batch_size=a.batch, warmup_steps=0)
    rows = [measure("full", loss, variables, run, True, batch, a.steps)]
    lora_vars = {"params": add_lora(variables["params"], a.rank, "attention")}
    rows.append(measure(f"LoRA r{a.rank} attention", lora_loss(loss), lora_vars, run, is_lora, batch, a.steps))
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    device = f"{jax.devices()[0].platform} ({platform.machine()}, {jax.device_count()} devices)"
    head = (
        f"## LoRA vs full fine-tuning, Stage C · {when} · {device} · jax {jax.__version__}\n\n"
        f"prior c={a.c}, depth={a.depth}, f32, batch {a.batch} × {a.size}² latents, {a.steps} timed steps "
        "(after one compiling step); bytes are the train state's trained params + AdamW state + EMA\n\n"
    )
    cols = list(rows[0])
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        table += "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |\n"
    print(head + table)
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
        f.write("\n" + head + table)


if __name__ == "__main__":
    main()
