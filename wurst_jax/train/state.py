"""Train state, optimizer, jitted (and sharded) train step, and orbax save/resume.

f32 master weights (`param_dtype=float32`) with bf16 compute (`dtype=bfloat16`) are a matter of how the module
is built; the state holds the trained params, optimizer state, an EMA of the trained params, BatchNorm statistics
(Stage A) and the PRNG key, so a resumed run continues bit for bit.

Trainable mask: `create_state(..., trainable=...)` splits the parameters once into the trained leaves
(`state.params`: differentiated, in the optimizer state and the EMA) and the frozen ones (`state.frozen`: carried
bit-equal, never differentiated, never donated or copied by the step, not written to checkpoints). The loss always
sees the whole tree (`merge_params(state.params, state.frozen)`). By default everything trains and `frozen` is {}.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wurst_jax.sharding import DATA, param_specs


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trained leaves only (all of them without a mask)
    opt_state: Any  # of `params` only
    ema: Any  # of `params` only
    batch_stats: Any
    rng: jax.Array
    frozen: Any = flax.struct.field(default_factory=dict)  # the leaves the mask freezes, as given


# a predicate on a parameter's key path (("blocks_0", "attention", "to_q", "kernel") -> bool), a tree of bools
# shaped like the params, or one bool for all
Trainable = bool | Callable[[tuple[str, ...]], bool] | Any


def split_params(params: Any, trainable: Trainable = True) -> tuple[Any, Any]:
    """(trained, frozen): the leaves of the nested-dict `params` that `trainable` selects and the others, each a
    nested dict of its own leaves only (emptied subtrees dropped)."""
    if trainable is True:
        return params, {}
    if trainable is False:
        return {}, params
    flat = traverse_util.flatten_dict(params)
    if callable(trainable):
        keep = {path: bool(trainable(path)) for path in flat}
    else:
        mask = traverse_util.flatten_dict(trainable)
        if set(mask) != set(flat):
            odd = sorted("/".join(p) for p in set(mask) ^ set(flat))[:5]
            raise ValueError(f"the trainable mask does not match the parameters' paths (e.g. {odd})")
        keep = {path: bool(mask[path]) for path in flat}
    trained = traverse_util.unflatten_dict({p: x for p, x in flat.items() if keep[p]})
    return trained, traverse_util.unflatten_dict({p: x for p, x in flat.items() if not keep[p]})


def merge_params(trained: Any, frozen: Any) -> Any:
    """The whole parameter tree from `split_params`'s two halves (trained leaves first, then the frozen ones)."""
    if not frozen:
        return trained
    if not trained:
        return frozen
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trained), **traverse_util.flatten_dict(frozen)})


def make_optimizer(
    lr: float, warmup_steps: int = 100, weight_decay: float = 0.01, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    """AdamW with linear warm-up to `lr` then constant (as the Würstchen scripts), global-norm clipping first;
    an update with a non-finite gradient is skipped (up to 10 in a row, then it raises NaNs through)."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)], [max(warmup_steps, 1)]
    )
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, b2=0.999, weight_decay=weight_decay))
    return optax.apply_if_finite(tx, max_consecutive_errors=10)  # a non-finite step is skipped, not applied


def create_state(
    params: Any, tx: optax.GradientTransformation, seed: int, batch_stats: Any = None, trainable: Trainable = True
) -> TrainState:
    """Step 0 of training `params` (the whole tree; `trainable` selects what trains, see `split_params`)."""
    trained, frozen = split_params(params, trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree_util.tree_map(jnp.copy, trained),  # the caller's arrays survive the step's donation
        opt_state=tx.init(trained),
        ema=jax.tree_util.tree_map(jnp.copy, trained),
        batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats if batch_stats is not None else {}),
        rng=jax.random.PRNGKey(seed),
        frozen=frozen,  # never donated: the caller's arrays themselves
    )


LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float = 0.999) -> Callable:
    """`loss_fn(params, batch_stats, rng, batch) -> (loss, aux)` of the whole parameter tree; aux may carry new
    `batch_stats`. Only the state's trained leaves (`state.params`) are differentiated, updated and averaged; its
    frozen leaves reach the loss as constants and come back unchanged.

    Returns `step(state, batch) -> (state, metrics)` (not jitted: see `jit_train_step`)."""

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)

        def loss_of(trained):
            return loss_fn(merge_params(trained, state.frozen), state.batch_stats, step_rng, batch)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema, params)
        new = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema=ema,
            batch_stats=aux.pop("batch_stats", state.batch_stats),
            rng=rng,
        )
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(grads)))
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        return new, metrics

    return step


def state_shardings(abstract_state: TrainState, boxed_params: Any, mesh: Mesh, mode: str) -> TrainState:
    """NamedShardings for the whole state: every leaf shaped like a parameter (params, frozen, EMA, Adam moments)
    follows that parameter's spec for `mode` ("dp" replicates, "fsdp" splits); everything else is replicated."""
    specs = traverse_util.flatten_dict(param_specs({"params": boxed_params}, mesh, mode)["params"])
    shapes = {
        path: leaf.shape for path, leaf in traverse_util.flatten_dict(flax.linen.meta.unbox(boxed_params)).items()
    }

    def sharding(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        for n in range(len(keys)):
            tail = keys[n:]
            if tail in specs and shapes[tail] == leaf.shape:
                return NamedSharding(mesh, specs[tail])
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def batch_sharding(mesh: Mesh) -> Callable[[Any], NamedSharding]:
    """Leading (batch) axis over "data", for every array of a batch."""
    return lambda x: NamedSharding(mesh, PartitionSpec(DATA, *([None] * (x.ndim - 1))))


class TrainStep:
    """`step(state, batch) -> (state, metrics)`, compiled once. The state is donated (its buffers reused); its
    frozen leaves travel as an argument of their own, neither donated, nor copied, nor returned."""

    def __init__(self, step: Callable, state_sh: TrainState | None = None, batch_sh: Any = None):
        def body(state, frozen, batch):
            new, metrics = step(state.replace(frozen=frozen), batch)
            return new.replace(frozen={}), metrics

        if state_sh is None:
            self.jitted = jax.jit(body, donate_argnums=0)
        else:  # a batch sharding None: the batch's own (`jax.jit` infers it)
            trained_sh = state_sh.replace(frozen={})
            shardings = dict(in_shardings=(trained_sh, state_sh.frozen, batch_sh), out_shardings=(trained_sh, None))
            self.jitted = jax.jit(body, **shardings, donate_argnums=0)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        return self.run(self.jitted, state, batch)

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The lowered program (state and batch: arrays or ShapeDtypeStructs); run its `compile()` with `run`."""
        return self.jitted.lower(state.replace(frozen={}), state.frozen, batch)

    @staticmethod
    def run(program: Callable, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One step through `program`: this step's jitted function or a compiled `lower(...)`."""
        new, metrics = program(state.replace(frozen={}), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics


def jit_train_step(step: Callable, state_sh: TrainState | None = None, batch_sh: Any = None) -> TrainStep:
    """One compiled train step; with shardings it runs sharded (state donated, so memory is reused)."""
    return TrainStep(step, state_sh, batch_sh)


class Checkpoints:
    """orbax `CheckpointManager` for the train state (keeps the last `keep`): all of it but the frozen leaves,
    which a resumed run takes from its own initial weights (`restore`'s `like`)."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def save(self, state: TrainState) -> None:
        self.manager.save(int(state.step), args=ocp.args.StandardSave(_saved(state)))
        self.manager.wait_until_finished()

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """Restore into the structure, dtypes and shardings of `like` (arrays or ShapeDtypeStructs); the frozen
        leaves are `like`'s. Without `step`, the newest checkpoint that restores: a corrupt one (truncated or
        deleted array files) is reported in one line on stderr and the previous one tried."""
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), _saved(like)
        )
        if step is not None:
            return self._restore(step, target, like)
        steps = sorted(self.manager.all_steps(), reverse=True)
        for s in steps:
            try:
                return self._restore(s, target, like)
            except Exception as e:  # orbax / tensorstore raise many kinds for a damaged checkpoint
                quiet_abandoned_reads()
                why = " ".join(str(e).split())[:200]
                print(
                    f"checkpoint step {s} in {self.manager.directory} does not restore ({type(e).__name__}: {why}); "
                    "skipping it",
                    file=sys.stderr,
                )
        raise ValueError(f"{self.manager.directory}: no checkpoint restores (steps {steps})")

    def _restore(self, step: int, target: Any, like: TrainState) -> TrainState:
        return TrainState(**self.manager.restore(step, args=ocp.args.StandardRestore(target)), frozen=like.frozen)


def quiet_abandoned_reads() -> None:
    """After a failed restore, tensorstore may finish the checkpoint's other reads from its own threads and post
    them to orbax's event loop, already closed: each is reported through `sys.unraisablehook` as a bare
    "RuntimeError: Event loop is closed" traceback. From then on this process drops exactly those reports (the
    failure itself was reported in one line); every other unraisable exception still reaches the hook."""
    hook = sys.unraisablehook
    if getattr(hook, "drops_closed_loop_reports", False):
        return

    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    unraisable.drops_closed_loop_reports = True
    sys.unraisablehook = unraisable


def _saved(state: TrainState) -> dict:
    """What a checkpoint holds: the state's fields but `frozen`, as a dict (checkpoints written before the state
    had `frozen` restore the same)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "frozen"}


def train_loop(
    state: TrainState,
    step_fn: Callable,
    batch_at: Callable[[int], Any],
    steps: int,
    stage: str,
    ckpts: Checkpoints,
    metrics_file: str | Path,
    log_every: int = 50,
    ckpt_every: int = 500,
    log: Callable[[str], None] = print,
    max_seconds: float | None = None,
) -> TrainState:
    """Step from `state.step` to `steps`: batch k is `batch_at(k)`; every `log_every` steps the mean loss, the
    last gradient norm and seconds per step go to `metrics_file` (JSON lines) and `log`; every `ckpt_every`
    steps, and at the end, the whole state is saved. The host reads the metrics back only when it logs, so it
    prepares the next batch while the device runs the step. With `max_seconds` the loop also ends (logged and
    saved like the last step) at the first step that finishes that long after it started: a run inside a job's
    time limit, continued by running it again."""
    if log_every < 1 or ckpt_every < 1:
        raise ValueError(f"log_every and ckpt_every must be >= 1, got {log_every} and {ckpt_every}")
    t0, losses, k = time.perf_counter(), [], int(state.step)
    deadline = None if max_seconds is None else t0 + max_seconds
    while k < steps:
        state, m = step_fn(state, batch_at(k))
        losses.append(m["loss"])
        k += 1
        last = k == steps or (deadline is not None and time.perf_counter() >= deadline)
        if k % log_every == 0 or last:
            rec = {
                "stage": stage,
                "step": k,
                "loss": float(np.mean(jax.device_get(losses))),
                "grad_norm": float(m["grad_norm"]),
                "s_per_step": (time.perf_counter() - t0) / len(losses),
            }
            with open(metrics_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(json.dumps(rec))
            t0, losses = time.perf_counter(), []
        if k % ckpt_every == 0 or last:
            ckpts.save(state)
        if last:
            break
    if k < steps:
        log(f"stage {stage}: stopped at step {k} of {steps} (max_seconds {max_seconds}); run again to continue")
    return state
