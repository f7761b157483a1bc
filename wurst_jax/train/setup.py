"""One train setup for every trainer (fine-tuning, the tiny recipe, the train-step benchmark): the optimizer, the
train state made where it lives (sharded over a mesh, or committed to one device), its shardings and the jitted
step, with a trainable mask.

    setup = build_train_setup(loss_fn, variables, run, module=prior, mesh=mesh, mode="fsdp",
                              trainable=lambda path: "lora" in path[-2])
    state, metrics = setup.step(setup.state, batch)

`variables` is `{"params": ..., "batch_stats": ...}` (batch_stats optional) or a function making it, which then
runs inside one jit with the state's shardings as `out_shardings`: the whole tree is never built on one device
first. `trainable` (see `state.split_params`) selects the trained leaves; the frozen ones go into `state.frozen`
as given (placed on the mesh, not copied) and the optimizer state and the EMA hold the trained ones only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, SingleDeviceSharding

from wurst_jax.train.config import RunConfig
from wurst_jax.train.state import (
    LossFn,
    Trainable,
    TrainState,
    TrainStep,
    create_state,
    make_optimizer,
    make_train_step,
    split_params,
    state_shardings,
)

MODES = ("dp", "fsdp")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    tx: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs of the state (without shardings)
    shardings: TrainState | None  # a NamedSharding per leaf of the state; None: one device, no mesh
    train_step: Callable  # `step(state, batch) -> (state, metrics)`, not jitted (to lower or count FLOPs)
    step: TrainStep  # the same, jitted: state donated, sharded as `shardings`
    state: TrainState | None  # the initial state on its devices; None when built with allocate=False
    trainable: Trainable
    seed: int

    def make_state(self, variables: Any, donate: bool = False) -> TrainState:
        """A state from `variables` (a dict, or a function making it inside the jit), on the setup's devices.
        `donate` lets the state reuse the buffers of a dict's trained leaves (the caller's arrays are then gone)."""
        sharding = self.shardings or SingleDeviceSharding(jax.devices()[0])  # one committed device: one compile
        if callable(variables):
            return jax.jit(lambda: self._init(variables()), out_shardings=sharding)()
        trained, frozen = split_params(variables["params"], self.trainable)
        stats = variables.get("batch_stats")
        trained_sh = sharding if self.shardings is None else sharding.replace(frozen={})
        make = jax.jit(
            lambda p, s: create_state(p, self.tx, self.seed, s),
            out_shardings=trained_sh,
            donate_argnums=(0,) if donate else (),
        )
        state = make(trained, stats)
        # the frozen leaves as they are when already in place (jax.device_put copies nothing then)
        return state.replace(frozen=jax.device_put(frozen, sharding if self.shardings is None else sharding.frozen))

    def _init(self, variables: dict) -> TrainState:
        return create_state(variables["params"], self.tx, self.seed, variables.get("batch_stats"), self.trainable)


def build_train_setup(
    loss_fn: LossFn,
    variables: Any,
    run: RunConfig,
    *,
    module: Any = None,
    mesh: Mesh | None = None,
    mode: str = "fsdp",
    trainable: Trainable = True,
    batch_shardings: Any = None,
    allocate: bool = True,
    submodules: dict[str, Any] | None = None,
) -> TrainSetup:
    """The optimizer (`make_optimizer(run.lr, run.warmup_steps)`), the state (seed `run.seed`, the trained leaves
    of `variables["params"]` that `trainable` selects), its shardings and the step (`make_train_step(loss_fn, tx,
    run.ema_decay)`, jitted).

    `loss_fn(params, batch_stats, rng, batch) -> (loss, aux)` takes the whole parameter tree. With a `mesh`,
    `module` (whose variables these are) names the parameters' logical axes and `mode` ("dp" or "fsdp") how they
    are split (`state_shardings`); `batch_shardings` fixes the batch's (default: whatever the batch has).
    `allocate=False` makes nothing: `abstract` and `shardings` only (`make_state` makes the state later).
    `submodules` {name: module}: the modules of extra top-level subtrees of the params (a frozen text encoder
    under "text_encoder"), placed by their own logical axes like `module`'s."""
    if mesh is not None and mode not in MODES:
        raise ValueError(f"sharding must be one of {MODES}, got {mode!r}")
    if mesh is not None and module is None:
        raise ValueError("a sharded train setup needs the module (its parameters' logical axes)")
    tx = make_optimizer(run.lr, run.warmup_steps)
    init = lambda v: create_state(v["params"], tx, run.seed, v.get("batch_stats"), trainable)  # noqa: E731
    abstract = jax.eval_shape(lambda: init(variables())) if callable(variables) else jax.eval_shape(init, variables)
    shardings = None
    if mesh is not None:
        from wurst_jax.models import abstract_variables

        boxed = dict(abstract_variables(module, boxed=True)["params"])
        boxed.update({name: abstract_variables(m, boxed=True)["params"] for name, m in (submodules or {}).items()})
        shardings = state_shardings(abstract, boxed, mesh, mode)
    train_step = make_train_step(loss_fn, tx, run.ema_decay)
    setup = TrainSetup(
        tx=tx,
        abstract=abstract,
        shardings=shardings,
        train_step=train_step,
        step=TrainStep(train_step, shardings, batch_shardings),
        state=None,
        trainable=trainable,
        seed=run.seed,
    )
    return dataclasses.replace(setup, state=setup.make_state(variables)) if allocate else setup
