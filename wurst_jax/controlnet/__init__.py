"""Stable Cascade ControlNet: the condition filters (`filters.py`) and the stage C ControlNet training loss
(`training.py`). The model is `wurst_jax.models.cascade.controlnet`."""
