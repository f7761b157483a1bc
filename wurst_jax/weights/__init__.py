"""PyTorch-format weights (safetensors, state dicts) → Flax variables, checked against the module's shapes."""

from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.load import KINDS, build_module, convert_state_dict, load_component, read_config

__all__ = ["KINDS", "WeightsError", "build_module", "convert_state_dict", "load_component", "read_config"]
