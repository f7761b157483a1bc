"""PyTorch-format weights (safetensors, state dicts) → Flax variables, checked against the module's shapes;
orbax checkpoints of converted variables, and the way back to diffusers / transformers folders."""

from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.export import export_component
from wurst_jax.weights.load import KINDS, build_module, convert_state_dict, load_component, read_config
from wurst_jax.weights.orbax_io import restore_variables, save_variables

__all__ = [
    "KINDS",
    "WeightsError",
    "build_module",
    "convert_state_dict",
    "export_component",
    "load_component",
    "read_config",
    "restore_variables",
    "save_variables",
]
