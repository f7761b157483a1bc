"""Our own checkpoints: a variables tree saved with orbax and restored straight onto its target shardings.

A converted component folder is `config.json` (as in the diffusers / transformers folder it came from) plus
`orbax/`, a `StandardCheckpointer` checkpoint of the variables tree. Restoring takes the abstract target tree
(`abstract_variables(module)`, already in the wanted dtype): every leaf becomes a `ShapeDtypeStruct` carrying a
sharding (one device by default, or the `NamedSharding`s the caller passes), so each array is read from disk
directly into its final placement and cast there when the stored dtype differs — no host copy of the tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from wurst_jax.weights.errors import WeightsError, mismatch_error

ORBAX_DIR = "orbax"


def is_orbax_component(folder: str | os.PathLike) -> bool:
    """True for a converted component folder (`config.json` + `orbax/`)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and (folder / ORBAX_DIR).is_dir()


def save_variables(variables: Any, directory: str | os.PathLike) -> Path:
    """Write `variables` (jax.Array leaves) as an orbax checkpoint at `directory`, which must not exist yet.

    The layout is `StandardCheckpointer`'s (restore with it, or with `restore_variables`), written synchronously
    and without orbax's default zstd compression: weights barely compress (≈10 %), and compressing holds a
    compressed copy of every array in memory until it is written (peak ≈ 1.7× the model instead of ≈ 1.05×)
    and makes restoring slower. numpy leaves work too but orbax copies them first: pass jax arrays.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory}: already exists; orbax checkpoints are written into a new folder")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(directory, args=ocp.args.PyTreeSave(variables))
    return directory


def stored_metadata(directory: str | os.PathLike) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{flat path: (shape, dtype)} of the arrays in an orbax checkpoint, read from its metadata only."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise WeightsError(f"{directory}: no orbax checkpoint here")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(directory).item_metadata.tree
    except Exception as e:  # orbax raises several types for missing / corrupt metadata
        raise WeightsError(f"{directory}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
    flat = traverse_util.flatten_dict(dict(tree))
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat.items()}


def restore_variables(directory: str | os.PathLike, target: Any, shardings: Any = None) -> Any:
    """Restore an orbax checkpoint into the structure, shapes and dtypes of `target` (a ShapeDtypeStruct tree).

    `shardings`: None (every array on the first device), one `jax.sharding.Sharding` for all leaves, or a pytree
    of shardings shaped like `target`. Stored arrays in another dtype are cast to the target's. Missing,
    unexpected or mis-shaped arrays raise one `WeightsError` listing them all, before any array is read.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    # Checked here rather than left to orbax: its refusal names one array and leaves its reads pending.
    _check_against(directory, stored_metadata(directory), traverse_util.flatten_dict(target))
    abstract = jax.tree_util.tree_map(
        lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, _shardings_like(target, shardings)
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(directory, abstract)
    except Exception as e:  # a data file missing or damaged after the metadata was read
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        raise WeightsError(f"{directory}: restoring the orbax checkpoint failed ({problem})") from None


def _shardings_like(target: Any, shardings: Any) -> Any:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda _: shardings, target)
    return shardings


def _check_against(directory: Path, stored: dict, flat_target: dict) -> None:
    missing = ["/".join(p) for p in flat_target if p not in stored]
    unexpected = ["/".join(p) for p in stored if p not in flat_target]
    misshaped = [
        f"{'/'.join(p)}: checkpoint {stored[p][0]}, model expects {tuple(t.shape)}"
        for p, t in flat_target.items()
        if p in stored and stored[p][0] != tuple(t.shape)
    ]
    if missing or unexpected or misshaped:
        headline = f"{directory}: the checkpoint does not fit the model built from config.json"
        raise mismatch_error(headline, missing, unexpected, misshaped)
