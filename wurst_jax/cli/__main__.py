"""`python -m wurst_jax.cli ...`, the same as `wurst-jax ...`."""

from wurst_jax.cli import run

run()
