"""Convert a diffusers Würstchen pipeline folder (or one component folder) into a wurst_jax converted folder.

python convert/from_diffusers.py warp-ai/wuerstchen-prior/ out/wuerstchen-prior [--dtype bfloat16]
    [--components prior,text_encoder] [--overwrite] [--allow-nonfinite]
"""

import argparse
import sys
from pathlib import Path

from wurst_jax.cli.convert import add_convert_arguments, run_convert

if __name__ == "__main__":
    parser = add_convert_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args()
    if not Path(args.src).is_dir():
        parser.error(f"{args.src}: expected a diffusers pipeline or component folder")
    sys.exit(run_convert(args))
