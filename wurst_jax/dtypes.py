"""The dtypes wurst_jax accepts by name (CLI flags, config keys, manifests) and the floating-point test that knows
bfloat16 (numpy's `kind` does not: ml_dtypes' bfloat16 reports kind 'V')."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_name(dtype: Any, what: str = "dtype") -> str:
    """`dtype` (a name from DTYPES or a dtype) → its name; a ValueError naming `what` for anything else."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of {tuple(DTYPES)}, got {dtype!r}")
    return name


def is_float(dtype: Any) -> bool:
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)
