"""Parameter memory per device for each sharding mode, the four released Stable Cascade UNets, from `jax.eval_shape`.

Usage: python benchmarks/cascade_memory_table.py [--dtype bfloat16|float32] [--devices 1 4 8]
Prints a Markdown table (weights only: activations, the text / image encoders and stage A come on top). Nothing is
allocated, so it runs on any machine in seconds.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from memory_table import MeshSizes, per_device_bytes  # noqa: E402  (the v2 table's per-device arithmetic)

from wurst_jax.models import abstract_variables, registry  # noqa: E402
from wurst_jax.models.cascade import StableCascadeUNetConfig  # noqa: E402

PRESETS = ("stage_c", "stage_c_lite", "stage_b", "stage_b_lite")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8])
    a = ap.parse_args(argv)
    dt = getattr(jnp, a.dtype)
    spec = registry.get("cascade_unet")
    cols = []
    for n in a.devices:
        cols += [(f"dp ×{n}", MeshSizes({"data": n, "model": 1}), "dp")]
        if n > 1:  # on one device fsdp is dp
            cols += [(f"fsdp ×{n}", MeshSizes({"data": n, "model": 1}), "fsdp")]
        if n % 2 == 0:  # tp splits the heads of attention levels (32, 24, 20, 18): all divide by 2
            cols += [(f"tp ×{n} ({n // 2}×2)", MeshSizes({"data": n // 2, "model": 2}), "tp")]
    print(f"| GiB per device ({a.dtype} weights) | params | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name in PRESETS:
        config = getattr(StableCascadeUNetConfig, name)()
        tree = abstract_variables(spec.build(config, dt), boxed=True)
        count = sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_variables(spec.build(config))))
        cells = []
        for _, mesh, mode in cols:
            heads = spec.heads(config)
            if mode == "tp" and any(h % mesh.shape["model"] for h in heads):
                cells.append(f"— (heads {sorted(set(heads))})")
            else:
                cells.append(f"{per_device_bytes(tree, mesh, mode) / 2**30:.3f}")
        print(f"| {name} | {count:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
