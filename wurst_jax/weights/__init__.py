"""PyTorch-format weights ↔ Flax variables, and the converted folders wurst_jax writes.

- `sources.py`: open a component folder / `.safetensors` / `.pt` → its kind, config and (unread) tensors.
- `layout.py`: the one name and layout rule between PyTorch keys and Flax paths; `mapping.py` applies it to a
  whole state dict, checked against the module's `jax.eval_shape`.
- `load.py`: `load_component`; `export.py`: back to diffusers / transformers folders; `converted.py`:
  `convert_checkpoint` (orbax + manifest folders); `orbax_io.py`, `safetensors_io.py`, `torch_pickle.py`: the file
  formats.
"""

from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.export import export_component
from wurst_jax.weights.load import KINDS, build_module, convert_state_dict, load_component
from wurst_jax.weights.orbax_io import restore_variables, save_variables
from wurst_jax.weights.sources import read_config

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
