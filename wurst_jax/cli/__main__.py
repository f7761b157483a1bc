"""`python -m wurst_jax.cli ...`, the same as `wurst-jax ...`."""

import sys

from wurst_jax.cli import main

sys.exit(main())
