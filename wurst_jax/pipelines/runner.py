"""The stage runner every diffusion stage of every pipeline uses: initial latents → one compiled denoising loop →
final latents, kept on the device.

A stage is described by its component, a `model_fn(module, variables, x, r, conditioning)` (how the family's
model is called), a sampler and the two random streams it draws from. Conditioning is a dict of arrays [N, ...]
(host or device); with classifier-free guidance the unconditional dict has the same structure and both halves
run as one batch inside the loop. Batches are padded to the mesh's data axis; the result keeps that padding
(`n` real rows first) so the next stage can take it without a trip through the host.

`scan_blocks` runs a model's repeated blocks (modules with a `scan_blocks` field: the prior's triples, the
decoder's level repeats, Stable Cascade's level repeats) as one `lax.scan` inside the loop, so XLA compiles one
repeat instead of all of them. Measured (benchmarks/scan_compile.py, RESULTS.md), it compiles up to 2.4× as fast
but runs slower: each sampling step slices every repeat's weights out of the stacked parameters again (a copy of
the stage's weights per step). On the CPU, bf16, the v2 prior's loop ran 1.25× (8 triples, 256²) and 1.76×
(32 triples, 128²) as long scanned, Stable Cascade's stage B loop 2.1× (128²). Compiling is paid once per
machine (the persistent cache and the kept programs of `wurst_jax.warm`), running on every image, so every kind
runs unrolled by default (`SCAN_BLOCKS`); `StageRunner.scan_blocks = True` (or an entry in `SCAN_BLOCKS`) scans
where compile time matters more. Outputs equal (tests/test_inference_scan.py, tests/test_cascade_inference_scan.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.lora.adapter import merge
from wurst_jax.models import registry
from wurst_jax.pipelines import random
from wurst_jax.pipelines.components import Component
from wurst_jax.pipelines.runtime import CompileCache
from wurst_jax.samplers import Sampler, denoise_loop, guided
from wurst_jax.sharding import ShardingPlan

# registry kind -> inference default (others: unrolled); see the module docstring
SCAN_BLOCKS: dict[str, bool] = {"prior": False, "decoder": False, "cascade_unet": False}
# run_loop's positional arguments: the batch axis of each (None: replicated), for `ShardingPlan.per_device`
LOOP_AXES = (None, 0, None, 1, 0, 0, None, 0, None)
ModelFn = Callable[[Any, Any, jax.Array, jax.Array, dict], jax.Array]  # (module, variables, x, r, conditioning)


def run_loop(
    variables: Any,
    noise: jax.Array,
    timesteps: jax.Array,
    step_noise: jax.Array,
    cond: dict,
    uncond: dict | None,
    guidance: jax.Array,
    x_init: jax.Array | None,
    adapters: list | None = None,
    *,
    module: Any,
    model_fn: ModelFn,
    sampler: Sampler,
) -> jax.Array:
    """The compiled body of a stage: `denoise_loop` over `model_fn`, guided when `uncond` is given. `adapters`
    [(LoRA layers, scale)] are merged into the weights here, once per call: they are arguments, so new scales or
    another adapter of the same shapes reuse the executable."""
    streamed = set(getattr(module, "streamed_names", tuple)())
    if streamed:  # sequential offload: all but the streamed blocks to the device once, before the loop
        to_device = lambda tree: jax.device_put(tree, jax.memory.Space.Device)  # noqa: E731
        params = {k: v if k in streamed else to_device(v) for k, v in variables["params"].items()}
        variables = {**{k: to_device(v) for k, v in variables.items() if k != "params"}, "params": params}
    if adapters:
        variables = merge(variables, adapters)
    model = lambda x, r, c: model_fn(module, variables, x, r, c)  # noqa: E731
    if uncond is None:
        return denoise_loop(model, cond, sampler, timesteps, noise, step_noise, x_init)
    both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), cond, uncond)
    return denoise_loop(guided(model, guidance), both, sampler, timesteps, noise, step_noise, x_init)


class StageRunner:
    """One diffusion stage of a pipeline (see the module docstring)."""

    def __init__(
        self,
        name: str,
        component: Component,
        model_fn: ModelFn,
        sampler: Sampler,
        plan: ShardingPlan,
        compiler: CompileCache,
        streams: tuple[random.Stream, random.Stream],
        scan_blocks: bool | None = None,
    ):
        self.name, self.component, self.model_fn, self.sampler = name, component, model_fn, sampler
        self.plan, self.compiler, self.streams = plan, compiler, streams
        self.scan_blocks = SCAN_BLOCKS.get(_kind(component.module), False) if scan_blocks is None else scan_blocks
        self.adapters: Callable[[], list | None] = lambda: None  # unfused LoRA adapters (set by the pipeline)

    @property
    def module(self) -> Any:
        """The component's module as the loop runs it: with `scan_blocks` set where the module has the option."""
        module = self.component.module
        if hasattr(module, "scan_blocks") and module.scan_blocks != self.scan_blocks:
            module = module.clone(scan_blocks=self.scan_blocks)
        if getattr(self.component, "streams", False):  # sequential offload (components.Component)
            module = module.clone(stream_blocks=True)
        return module

    def __call__(
        self,
        n: int,
        shape: tuple[int, ...],
        timesteps: np.ndarray,
        cond: dict,
        uncond: dict | None = None,
        guidance: float = 0.0,
        seed: Any = None,
        latents: Any = None,
        step_noise: Any = None,
        x_init: Any = None,
    ) -> jax.Array:
        """The final latents [padded N, *shape] (f32, on the device). `latents` / `step_noise` ([S, N, *shape])
        replace what `seed` draws; `x_init` [N, *shape] starts from that sample noised to `timesteps[0]`."""
        steps = len(timesteps) - 1
        if latents is None and step_noise is None:  # both drawn by one compiled program
            keys, fold = random.seed_keys(seed, n)
            static = dict(fold=fold, n=n, streams=tuple(self.streams), shape=tuple(shape), steps=steps)
            x, eps = self.compiler("noise", random.stage_noise, static, keys, report=False)
        else:
            keys = random.image_keys(seed, n) if latents is None or step_noise is None else None
            x = random.draw(keys, self.streams[0], shape) if latents is None else given("latents", latents, (n, *shape))
            if step_noise is None:
                eps = random.step_noise(keys, self.streams[1], steps, shape)
            else:
                eps = given("step_noise", step_noise, (steps, n, *shape))
        plan = self.plan
        batch = lambda tree: None if tree is None else jax.tree_util.tree_map(plan.batch, tree)  # noqa: E731
        grid = "×".join(map(str, shape[:-1]))
        detail = f"{steps} steps × {n} images{' + CFG' if uncond is not None else ''}, latent {grid}"
        static = {"module": self.module, "model_fn": self.model_fn, "sampler": self.sampler}
        # streamed blocks move between memory spaces inside the loop, which XLA places for the whole program
        streamed = getattr(self.component, "streams", False)
        with self.component.on_device() as variables:
            return self.compiler(
                self.name,
                run_loop if streamed else plan.per_device(run_loop, LOOP_AXES),
                static,
                variables,
                plan.batch(x),
                plan.replicated(np.asarray(timesteps, np.float32)),
                plan.batch(eps, axis=1),
                batch(cond),
                batch(uncond),
                plan.replicated(np.float32(guidance)),
                None if x_init is None else plan.batch(x_init),
                self.adapters(),
                detail=detail,
            )


def _kind(module: Any) -> str | None:
    """The registry kind of a stage's module (None for a module the registry does not know)."""
    try:
        return registry.for_module(module).kind
    except TypeError:
        return None


def decode_images(variables: Any, latents: jax.Array, *, module: Any) -> jax.Array:
    """Stage A (both generations' Paella VQGAN): decoder latents [B, H, W, 4] → images [B, 4H, 4W, 3] in [0, 1]
    (f32)."""
    scaled = latents * module.config.scale_factor
    images = module.apply(variables, scaled, method="decode")
    return jnp.clip(images.astype(jnp.float32), 0.0, 1.0)


def setup_plan(
    mesh: Any, sharding: str | None, progress: bool, compiler: CompileCache | None
) -> tuple[ShardingPlan, CompileCache]:
    """A pipeline's sharding plan ("dp" unless told) and compile cache (its own unless one is shared)."""
    return ShardingPlan(mesh, sharding or "dp"), compiler or CompileCache(progress)


def given(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A caller-given array checked against the shape the stage needs."""
    arr = ShardingPlan.host(value).astype(np.float32)
    if arr.shape != shape:
        raise ValueError(f"`{name}` has shape {arr.shape}, expected {shape}")
    return arr
