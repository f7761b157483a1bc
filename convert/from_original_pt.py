"""Convert an original Würstchen `.pt` checkpoint (`state_dict` / `ema_state_dict`) into a converted folder.

python convert/from_original_pt.py model_v2_stage_c.pt out/prior --stage prior [--config config.json]
The file is read with torch.load(weights_only=True): a pickle holding anything but tensors is refused.
"""

import argparse
import sys

from wurst_jax.cli.convert import PICKLE_SUFFIXES, add_convert_arguments, run_convert

if __name__ == "__main__":
    parser = add_convert_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args()
    if not args.src.endswith(PICKLE_SUFFIXES) or args.stage is None:
        parser.error(f"expected a {'/'.join(PICKLE_SUFFIXES)} file and --stage")
    sys.exit(run_convert(args))
