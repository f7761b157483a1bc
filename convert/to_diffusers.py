"""Export a component (converted or diffusers folder, e.g. after fine-tuning) as a diffusers / transformers folder.

python convert/to_diffusers.py out/prior/prior exported/prior [--dtype float32]
The result loads with diffusers' `WuerstchenPrior.from_pretrained` (or `WuerstchenDiffNeXt`, `PaellaVQModel`,
transformers' `CLIPTextModel`).
"""

import argparse
import sys

import jax.numpy as jnp

import wurst_jax as wj
from wurst_jax.weights import export_component

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="component folder (config.json + orbax/ or safetensors)")
    parser.add_argument("dst", help="output folder (config.json + *.safetensors)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="tensor dtype (float32)")
    args = parser.parse_args()
    try:
        module, variables = wj.load_component(args.src, dtype=getattr(jnp, args.dtype))
        print(export_component(module, variables, args.dst))
    except (ValueError, OSError) as e:
        sys.exit(f"to_diffusers: error: {e}")
