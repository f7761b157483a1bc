"""Parameter memory per device for each sharding mode, full-size Würstchen v2, from `jax.eval_shape` only.

Usage: python benchmarks/memory_table.py [--dtype bfloat16|float32] [--devices 1 4 8 64]
Prints a Markdown table (weights only; activations come on top and shrink with the data axis).
"""

import argparse
import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import wurst_jax as wj
from wurst_jax.models import abstract_variables
from wurst_jax.sharding import param_specs

STAGES = {
    "prior (C)": lambda dt: wj.WuerstchenPrior(wj.StageCConfig.v2(), dt, dt),
    "decoder (B)": lambda dt: wj.WuerstchenDiffNeXt(wj.StageBConfig.v2(), dt, dt),
    "vqgan (A)": lambda dt: wj.PaellaVQModel(wj.StageAConfig.v2(), dt, dt),
    "text bigG": lambda dt: wj.CLIPTextModel(wj.CLIPTextConfig.vit_bigg(), dt, dt),
    "text H": lambda dt: wj.CLIPTextModel(wj.CLIPTextConfig.vit_h(), dt, dt),
}


@dataclasses.dataclass
class MeshSizes:
    """What the sharding rules read from a mesh (axis sizes), without needing that many devices."""

    shape: dict

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())


def per_device_bytes(boxed, mesh, mode) -> int:
    specs = traverse_util.flatten_dict(param_specs(boxed, mesh, mode))
    total = 0
    for path, leaf in traverse_util.flatten_dict(boxed).items():
        value = getattr(leaf, "value", leaf)
        shards = 1
        for axes in specs[path]:
            for ax in (axes,) if isinstance(axes, str) else axes or ():
                shards *= mesh.shape[ax]
        total += value.size * np.dtype(value.dtype).itemsize // shards
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8, 64])
    a = ap.parse_args()
    dt = getattr(jnp, a.dtype)
    boxed = {name: abstract_variables(make(dt), boxed=True) for name, make in STAGES.items()}
    cols = []
    for n in a.devices:
        cols += [(f"dp ×{n}", MeshSizes({"data": n, "model": 1}), "dp")]
        cols += [(f"fsdp ×{n}", MeshSizes({"data": n, "model": 1}), "fsdp")]
        if n % 2 == 0:  # every head count of the v2 models (24; 10, 20; 20; 16) divides by 2, not all by 4
            cols += [(f"tp ×{n} ({n // 2}×2)", MeshSizes({"data": n // 2, "model": 2}), "tp")]
    print(f"| GiB per device ({a.dtype} weights) | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    totals = [0] * len(cols)
    for name, tree in boxed.items():
        row = [per_device_bytes(tree, mesh, mode) for _, mesh, mode in cols]
        totals = [t + r for t, r in zip(totals, row, strict=True)]
        print(f"| {name} | " + " | ".join(f"{b / 2**30:.3f}" for b in row) + " |")
    print("| **all five** | " + " | ".join(f"**{b / 2**30:.3f}**" for b in totals) + " |")


if __name__ == "__main__":
    main()
