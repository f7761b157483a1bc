"""Convert one original-layout `.safetensors` file (original Würstchen tensor names) into a converted folder.

python convert/from_original_safetensors.py stage_b.safetensors out/decoder --stage decoder [--config config.json]
"""

import argparse
import sys

from wurst_jax.cli.convert import add_convert_arguments, run_convert

if __name__ == "__main__":
    parser = add_convert_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args()
    if not args.src.endswith(".safetensors") or args.stage is None:
        parser.error("expected a .safetensors file and --stage")
    sys.exit(run_convert(args))
