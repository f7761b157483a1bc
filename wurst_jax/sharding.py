"""Device meshes and where every array goes: data parallel, FSDP and tensor parallel, one host or many.

The modules name the logical axes of their parameters (`embed`, `mlp`, `heads`, `conv_in`, `conv_out`, `kh`,
`kw`, `vocab`); this file alone maps them onto a `Mesh` with axes ("data", "model"):

- `dp`:   parameters replicated, the batch split over "data".
- `fsdp`: each parameter split along its largest dimension that divides over all devices ("data" × "model"),
          replicated if none does (biases, norms); the batch split over "data".
- `tp`:   attention heads and MLP hidden units split over "model" (Megatron style), the rest replicated; the
          batch split over "data" — on a data × model mesh this is data × tensor parallelism.

A `ShardingPlan(mesh, mode)` is the one object that says where everything goes: parameters
(`param_shardings`, used when loading) and activations (`batch`, `replicated`, and `host` to bring results back).
Batches that do not divide the "data" axis are padded (repeating the last row) and trimmed by the caller.
Arrays are built with `jax.make_array_from_callback`, so on several hosts each process only places its own
shards, and results come back through `multihost_utils.process_allgather`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODES = ("dp", "fsdp", "tp")
DATA, MODEL = "data", "model"

_TP_RULES = (("heads", MODEL), ("mlp", MODEL))


def make_mesh(data: int = -1, model: int = 1, devices: list | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all); one of the sizes may be -1 to fill the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, model]
    for name, s in zip((DATA, MODEL), sizes, strict=True):
        if not isinstance(s, int) or (s < 1 and s != -1):
            raise ValueError(f"mesh axis {name!r} must be a positive int or -1, got {s!r}")
    if sizes.count(-1) > 1:
        raise ValueError("only one mesh axis may be -1 (auto-filled)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if n % known:
        raise ValueError(f"mesh axes data={data}, model={model} do not divide the {n} devices")
    sizes = [n // known if s == -1 else s for s in sizes]
    if sizes[0] * sizes[1] != n:
        raise ValueError(
            f"mesh axes data={sizes[0]} × model={sizes[1]} = {sizes[0] * sizes[1]}, but there are {n} devices"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), (DATA, MODEL))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"sharding must be one of {MODES}, got {mode!r}")


def param_specs(boxed: Any, mesh: Mesh, mode: str) -> Any:
    """PartitionSpecs for a variables tree whose leaves carry logical axis names (`abstract_variables(boxed=True)`)."""
    _check_mode(mode)
    flat = traverse_util.flatten_dict(boxed)
    out = {}
    for path, leaf in flat.items():
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * len(leaf.shape)
        shape = nn.meta.unbox(leaf).shape
        out[path] = _spec(path, shape, names, mesh, mode)
    return traverse_util.unflatten_dict(out)


def _spec(path: tuple, shape: tuple, names: tuple, mesh: Mesh, mode: str) -> PartitionSpec:
    if mode == "dp" or not shape:
        return PartitionSpec()
    if mode == "fsdp":
        n = mesh.size
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        dim = next((d for d in dims if shape[d] % n == 0 and shape[d] >= n), None)
        if dim is None:
            return PartitionSpec()
        axes = [None] * len(shape)
        axes[dim] = (DATA, MODEL)
        return PartitionSpec(*axes)
    rules = dict(_TP_RULES)
    axes = [rules.get(name) for name in names]
    for d, ax in enumerate(axes):
        if ax and shape[d] % mesh.shape[ax]:
            raise ValueError(
                f"sharding='tp' cannot split {'/'.join(path)} (dimension {d} of size {shape[d]}) over the "
                f"{mesh.shape[ax]}-way '{ax}' axis; use a model axis size that divides it, or 'fsdp'"
            )
    return PartitionSpec(*axes)


def check_heads(heads: Any, mesh: Mesh, mode: str, name: str = "the model") -> None:
    """Tensor parallelism splits attention heads: every head count must divide over the model axis."""
    if mode != "tp" or mesh.shape[MODEL] == 1:
        return
    counts = [int(h) for h in heads if h and h > 0]
    k = mesh.shape[MODEL]
    bad = sorted({h for h in counts if h % k})
    if bad:
        common = math.gcd(*counts)
        sizes = [d for d in range(2, common + 1) if common % d == 0]
        fits = f"model axis sizes that split every count: {', '.join(map(str, sizes))}" if sizes else "none > 1 can"
        raise ValueError(
            f"sharding='tp' on a {k}-way model axis cannot split {name}'s attention heads {counts} "
            f"({', '.join(map(str, bad))} not divisible by {k}); {fits}; or use sharding='fsdp'"
        )


def param_shardings(boxed: Any, mesh: Mesh, mode: str) -> Any:
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), param_specs(boxed, mesh, mode), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize` for a multi-host run (no arguments on a TPU pod slice or under SLURM: JAX
    finds them). On CPU hosts the collectives go through gloo."""
    if (jax.config.jax_platforms or "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


class ShardingPlan:
    """Where parameters and activations go on `mesh` (None: one device, nothing sharded) for `mode`."""

    def __init__(self, mesh: Mesh | None = None, mode: str = "dp"):
        _check_mode(mode)
        self.mesh, self.mode = mesh, mode

    # ------------------------------------------------------------------ parameters

    def param_shardings(self, boxed: Any, heads: Any = (), name: str = "the model") -> Any:
        """NamedShardings for a variables tree with logical axis names (None without a mesh); `heads`: the
        attention head counts that tensor parallelism must split."""
        if self.mesh is None:
            return None
        check_heads(heads, self.mesh, self.mode, name)
        return param_shardings(boxed, self.mesh, self.mode)

    @staticmethod
    def place_fn(shardings: Any) -> Callable[[tuple, np.ndarray, Any], jax.Array]:
        """A `place(path, host_array, like)` for the converter: each process builds only its own shards."""
        flat = traverse_util.flatten_dict(shardings)

        def place(path: tuple, arr: np.ndarray, like: Any) -> jax.Array:
            arr = arr.astype(like.dtype, copy=False)
            return jax.make_array_from_callback(arr.shape, flat[path], lambda idx: arr[idx])

        return place

    # ------------------------------------------------------------------ activations

    @property
    def data_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[DATA]

    def padded(self, n: int) -> int:
        return -(-n // self.data_size) * self.data_size

    def batch(self, x: Any, axis: int = 0) -> jax.Array:
        """Pad axis `axis` to a multiple of the data axis (repeating the last row) and split it over "data"."""
        if self.mesh is None:
            return _to_device(x)
        if isinstance(x, jax.Array) and x.shape[axis] == self.padded(x.shape[axis]):
            spec = [None] * x.ndim
            spec[axis] = DATA
            sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x  # already in place: stays on the devices (outputs passed from stage to stage)
        x = self.host(x)
        n = x.shape[axis]
        pad = self.padded(n) - n
        if pad:
            last = np.take(x, [n - 1], axis=axis)
            x = np.concatenate([x] + [last] * pad, axis=axis)
        spec = [None] * x.ndim
        spec[axis] = DATA
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, PartitionSpec(*spec)), lambda i: x[i])

    def per_device(self, fn: Callable, axes: tuple[int | None, ...]) -> Callable:
        """`fn` as each device runs it: in "dp" mode on a mesh, `fn` under `jax.shard_map`, every device running the
        one-device program on its own slice of the batch (`axes`: each positional argument's batch axis, None for
        replicated ones; outputs split on axis 0), with no collective inside; else `fn` itself (one device, or
        fsdp/tp, which XLA partitions). Same function object for the same arguments (compiled once)."""
        if self.mesh is None or self.mode != "dp":
            return fn
        return _per_device(fn, self.mesh, tuple(axes))

    def replicated(self, x: Any) -> jax.Array:
        if self.mesh is None:
            return _to_device(x)
        x = self.host(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda i: x[i])

    @staticmethod
    def host(x: Any) -> np.ndarray:
        """A (possibly multi-host, sharded) array → the whole array as numpy on every process."""
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)


def _to_device(x: Any) -> jax.Array:
    """`jnp.asarray(x)` without a compiled program: a host array is put on the default device as it is (jnp.asarray
    compiles and runs a small `stage` program per shape, each a cache load in a new process)."""
    if isinstance(x, jax.Array):
        return x
    return jax.device_put(np.asarray(x))


@functools.cache
def _per_device(fn: Callable, mesh: Mesh, axes: tuple[int | None, ...]) -> Callable:
    # XLA compiles a batch split over "data" by partitioning the whole-batch program, which may fuse and tile the
    # per-device work differently from the one-device program (images then differ by rounding); under shard_map
    # each device compiles exactly `fn` at its local batch, so a dp run equals the one-device run at that batch
    specs = tuple(PartitionSpec() if a is None else PartitionSpec(*[None] * a, DATA) for a in axes)

    @functools.wraps(fn)
    def local(*args: Any, **static: Any) -> Any:
        body = functools.partial(fn, **static)
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(DATA), check_vma=False)(*args)

    return local
