"""LoRA for any Flax parameter tree: low-rank adapters, applied merged or beside frozen weights, read from and
written to diffusers / PEFT files (`pytorch_lora_weights.safetensors`) and the original Stable Cascade's
(`lora.safetensors`, `cascade_format.py`)."""

from wurst_jax.lora.adapter import LoraAdapter, apply_adapters, merge
from wurst_jax.lora.peft_format import LoraError, read_lora_file, write_lora_file

__all__ = ["LoraAdapter", "LoraError", "apply_adapters", "merge", "read_lora_file", "write_lora_file"]
