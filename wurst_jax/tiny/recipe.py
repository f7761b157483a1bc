"""A tiny Würstchen trained from scratch on the procedural shapes dataset: configs, the three training stages,
and export to the diffusers folder layout the pipeline loads.

Order: Stage A (VQGAN, reconstruction; optionally "a-decoder": more decoder training on the frozen encoder's
unquantised latents, which leaves the latent space Stage B learns unchanged) → Stage B with the semantic
encoder and the decoder's text encoder (ε-loss on Stage A latents, the encoder learning what Stage B needs) →
Stage C with the prior's text encoder (ε-loss on the frozen semantic encoder's latents). 64×64 images:
Stage A latents 16×16×4, semantic latents 8×8×16 (pipeline `resolution_multiple` 8, `latent_dim_scale` 2).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.models import (
    CLIPTextConfig,
    CLIPTextModel,
    PaellaVQModel,
    StageAConfig,
    StageBConfig,
    StageCConfig,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
)
from wurst_jax.pipelines.prompts import caption_tokens
from wurst_jax.tiny.semantic import SemanticEncoder
from wurst_jax.train import objectives
from wurst_jax.train.config import RunConfig, replace_checked
from wurst_jax.train.setup import build_train_setup
from wurst_jax.train.state import Checkpoints, train_loop


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    size: int = 64
    stage_a: StageAConfig = StageAConfig(bottleneck_blocks=2, embed_dim=64, num_vq_embeddings=256)
    stage_b: StageBConfig = StageBConfig(
        c_r=64,
        c_cond=64,
        c_hidden=(32, 64, 128),
        nhead=(-1, 4, 4),
        blocks=(2, 2, 2),
        level_config=("CT", "CTA", "CTA"),
        inject_effnet=(False, True, True),
        effnet_embd=16,
        clip_embd=64,
        dropout=0.0,
        patch_size=1,  # Stage B at the full 16 × 16 latent resolution: it redraws shapes far better than at 2
    )
    stage_c: StageCConfig = StageCConfig(c_in=16, c=128, c_cond=64, c_r=64, depth=4, nhead=4, dropout=0.0)
    text: CLIPTextConfig = CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    semantic_widths: tuple[int, ...] = (32, 64, 128)  # one stride-2 stage each: 8 × 8 semantic latents at 64²
    decoder_guidance: float = 4.0  # written to the export's model_index.json as `wurst-jax generate`'s default

    @property
    def resolution_multiple(self) -> float:
        """Image side over semantic latent side: one stride-2 stage per `semantic_widths` entry."""
        return float(2 ** len(self.semantic_widths))

    @property
    def latent_dim_scale(self) -> float:
        """Stage A latent side (size / 4) over semantic latent side."""
        return self.resolution_multiple / 4


def tiny_config(model: dict | None = None, size: int = 64, name: str = "config") -> TinyConfig:
    """A `TinyConfig` from a run config's "model" section: `semantic_widths`, `decoder_guidance`, and
    "stage_a" / "stage_b" / "stage_c" / "text" objects whose keys replace those of the default configs (the
    config classes' field names). A wrong key, type or size raises one ValueError naming the file `name`."""
    model, base = {} if model is None else model, TinyConfig()
    if not isinstance(model, dict):
        raise ValueError(f"{name}: key 'model' must be an object (the architecture), got {model!r}")
    subs = {"stage_a": base.stage_a, "stage_b": base.stage_b, "stage_c": base.stage_c, "text": base.text}
    known = {"semantic_widths", "decoder_guidance", *subs}
    if set(model) - known:
        unknown = sorted(set(model) - known)
        raise ValueError(f"{name}: config section 'model': unknown keys {unknown}; known: {sorted(known)}")
    kw: dict[str, Any] = {"size": size}
    for sub, default in subs.items():
        if sub in model:
            kw[sub] = replace_checked(default, model[sub], name, f"model.{sub}")
    widths = model.get("semantic_widths", base.semantic_widths)
    if not isinstance(widths, (list, tuple)) or not widths or not all(_positive_int(w) for w in widths):
        raise ValueError(f"{name}: key 'model.semantic_widths' must be a list of integers >= 1, got {widths!r}")
    kw["semantic_widths"] = tuple(widths)
    guidance = model.get("decoder_guidance", base.decoder_guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
        raise ValueError(f"{name}: key 'model.decoder_guidance' must be a number >= 0, got {guidance!r}")
    kw["decoder_guidance"] = float(guidance)
    cfg = TinyConfig(**kw)
    if size % cfg.resolution_multiple:
        raise ValueError(
            f"{name}: key 'size' must be a multiple of {int(cfg.resolution_multiple)} (2 ** len(semantic_widths)), "
            f"got {size!r}"
        )
    return cfg


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


_DECODER = ("up_blocks", "out_block")  # Stage A's decoder half; "a-decoder" refines it on frozen encoder latents


def modules(cfg: TinyConfig, dtype: Any = jnp.float32) -> dict[str, nn.Module]:
    """f32 master weights; `dtype` is the compute dtype (bf16 on accelerators)."""
    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    return {
        "vqgan": PaellaVQModel(cfg.stage_a, **kw),
        "decoder": WuerstchenDiffNeXt(cfg.stage_b, **kw),
        "prior": WuerstchenPrior(cfg.stage_c, **kw),
        "text": CLIPTextModel(cfg.text, **kw),
        "semantic": SemanticEncoder(cfg.stage_b.effnet_embd, cfg.semantic_widths, **kw),
    }


def _init(module: nn.Module, seed: int, *shapes: tuple) -> Any:
    args = [jnp.zeros(s, jnp.int32 if len(s) == 2 else jnp.float32) for s in shapes]
    return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), *args))


def init_variables(cfg: TinyConfig, mods: dict[str, nn.Module], seed: int = 0) -> dict[str, Any]:
    s, h, t = cfg.size, int(cfg.size // cfg.resolution_multiple), cfg.text.hidden_size
    return {
        "vqgan": _init(mods["vqgan"], seed, (1, s, s, 3)),
        "decoder": _init(mods["decoder"], seed + 1, (1, s // 4, s // 4, 4), (1,), (1, h, h, 16), (1, 77, t)),
        "prior": _init(mods["prior"], seed + 2, (1, h, h, 16), (1,), (1, 77, t)),
        "text_decoder": _init(mods["text"], seed + 3, (1, 77), (1, 77)),
        "text_prior": _init(mods["text"], seed + 4, (1, 77), (1, 77)),
        "semantic": _init(mods["semantic"], seed + 5, (1, s, s, 3)),
    }


_TOKENIZER = None  # a data worker's copy (see `_set_tokenizer`)


def _set_tokenizer(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _tiny_batch(size: int, batch_size: int, seed: int, step: int, tokenizer=None) -> dict:
    """Batch `step` of a run: a function of (seed, step) alone, so a resumed run sees exactly the batches it
    would have seen, whichever process makes it. Images travel as uint8 (made float32 by `_as_float`)."""
    from wurst_jax.tiny.data import batches

    b = next(batches(seed * 1_000_003 + step, batch_size, size=size, split="train"))
    ids, mask = caption_tokens(tokenizer or _TOKENIZER, b["captions"])
    return {"images": np.round(b["images"] * 255).astype(np.uint8), "ids": ids, "mask": mask}


def _as_float(batch: dict) -> dict:
    return {**batch, "images": batch["images"].astype(np.float32) / 255.0}  # = the dataset's own float32 images


class _Batches:
    """`batch_at(k)` for the train loop. With `workers` > 0 a process pool renders the next `workers * 2`
    batches ahead (the procedural data is CPU-bound; a GPU step of the tiny model is faster than one process
    renders a batch); with 0 it renders in this process. Either way batch k is the same."""

    def __init__(self, tokenizer, size: int, batch_size: int, seed: int, workers: int = 0):
        self.args, self.tokenizer, self.ahead, self.pending = (size, batch_size, seed), tokenizer, 2 * workers, {}
        self.pool = None
        if workers > 0:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_tokenizer,
                initargs=(tokenizer,),
            )

    def __call__(self, k: int) -> dict:
        if self.pool is None:
            return _as_float(_tiny_batch(*self.args, k, tokenizer=self.tokenizer))
        for j in range(k, k + self.ahead):
            if j not in self.pending:
                self.pending[j] = self.pool.submit(_tiny_batch, *self.args, j)
        for j in [j for j in self.pending if j < k]:
            self.pending.pop(j).cancel()
        return _as_float(self.pending.pop(k).result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def stage_loss(stage: str, cfg: TinyConfig, mods: dict, frozen: dict, run: RunConfig, empty: tuple) -> Any:
    """The loss of one stage as `loss(params, batch_stats, rng, batch) -> (loss, aux)`."""
    text, scale = mods["text"], cfg.stage_a.scale_factor
    empty_ids, empty_mask = (jnp.asarray(x) for x in empty)

    if stage == "a":

        def loss(params, stats, rng, batch):
            return objectives.stage_a_loss(mods["vqgan"], {"params": params, "batch_stats": stats}, batch["images"])

    elif stage == "b":

        def loss(params, stats, rng, batch):
            vq = frozen["vqgan"]
            latents = mods["vqgan"].apply(vq, batch["images"], method="encode") / scale
            effnet = mods["semantic"].apply({"params": params["semantic"]}, batch["images"])
            clip = text.apply({"params": params["text"]}, batch["ids"], batch["mask"])
            empty_clip = text.apply({"params": params["text"]}, empty_ids, empty_mask)
            value = objectives.stage_b_loss(
                mods["decoder"],
                params["decoder"],
                rng,
                jax.lax.stop_gradient(latents),
                effnet,
                clip,
                empty_clip,
                run.cond_dropout,
            )
            return value, {}

    elif stage == "c":

        def loss(params, stats, rng, batch):
            target = mods["semantic"].apply(frozen["semantic"], batch["images"])
            clip = text.apply({"params": params["text"]}, batch["ids"], batch["mask"])
            empty_clip = text.apply({"params": params["text"]}, empty_ids, empty_mask)
            r_drop, rng = jax.random.split(rng)
            clip = objectives.drop_text(r_drop, clip, empty_clip, run.cond_dropout)
            return objectives.stage_c_loss(
                mods["prior"], params["prior"], rng, jax.lax.stop_gradient(target), clip, weighting=run.loss_weighting
            ), {}

    elif stage == "a-decoder":
        encoder = {k: v for k, v in frozen["vqgan"]["params"].items() if not k.startswith(_DECODER)}
        stats = frozen["vqgan"]["batch_stats"]

        def loss(params, _, rng, batch):
            vq = {"params": {**encoder, **params}, "batch_stats": stats}
            z = jax.lax.stop_gradient(mods["vqgan"].apply(vq, batch["images"], method="encode"))
            z = z + 0.05 * jax.random.normal(rng, z.shape)  # Stage B's latents are close to, not exactly, these
            rec = mods["vqgan"].apply(vq, z, method="decode")
            return jnp.mean(jnp.square(rec.astype(jnp.float32) - batch["images"])), {}

    else:
        raise ValueError(f"stage must be 'a', 'a-decoder', 'b' or 'c', got {stage!r}")
    return loss


def trainable(stage: str, variables: dict) -> tuple[Any, Any]:
    """(params, batch_stats) trained in `stage`."""
    if stage == "a":
        return variables["vqgan"]["params"], variables["vqgan"]["batch_stats"]
    if stage == "a-decoder":
        return {k: v for k, v in variables["vqgan"]["params"].items() if k.startswith(_DECODER)}, {}
    if stage == "b":
        v = variables
        return {
            "decoder": v["decoder"]["params"],
            "semantic": v["semantic"]["params"],
            "text": v["text_decoder"]["params"],
        }, {}
    return {"prior": variables["prior"]["params"], "text": variables["text_prior"]["params"]}, {}


def absorb(stage: str, variables: dict, params: Any, stats: Any) -> dict:
    """Put a stage's trained params (use the EMA) back into the variables of all components."""
    v = dict(variables)
    if stage == "a":
        v["vqgan"] = {"params": params, "batch_stats": stats}
    elif stage == "a-decoder":
        v["vqgan"] = {**v["vqgan"], "params": {**v["vqgan"]["params"], **params}}
    elif stage == "b":
        v["decoder"], v["semantic"], v["text_decoder"] = (
            {"params": params[k]} for k in ("decoder", "semantic", "text")
        )
    else:
        v["prior"], v["text_prior"] = {"params": params["prior"]}, {"params": params["text"]}
    return v


def train_stage(
    stage: str, cfg: TinyConfig, variables: dict, tokenizer, run: RunConfig, out_dir: str | Path, log=print
) -> tuple[dict, int]:
    """Train one stage (resuming from `out_dir/ckpt_<stage>` if a checkpoint is there); returns the variables with
    the stage's EMA weights put in, and the step reached (`run.steps`, or fewer when `run.max_seconds` ran out)."""
    mods = modules(cfg)
    params, stats = trainable(stage, variables)
    frozen = {"vqgan": variables["vqgan"], "semantic": variables["semantic"]}
    loss = stage_loss(stage, cfg, mods, frozen, run, caption_tokens(tokenizer, [""]))
    setup = build_train_setup(loss, {"params": params, "batch_stats": stats}, run)
    state = setup.state
    ckpts = Checkpoints(Path(out_dir) / f"ckpt_{stage}")
    if ckpts.latest() is not None:
        state = ckpts.restore(state)
        log(f"stage {stage}: resumed at step {int(state.step)}")
    data = _Batches(tokenizer, cfg.size, run.batch_size, run.seed, run.data_workers)
    try:
        state = train_loop(
            state,
            setup.step,
            data,
            run.steps,
            stage,
            ckpts,
            Path(out_dir) / "metrics.jsonl",
            run.log_every,
            run.ckpt_every,
            log,
            run.max_seconds,
        )
    finally:
        data.close()
    return absorb(stage, variables, state.ema, state.batch_stats), int(state.step)


def export(cfg: TinyConfig, variables: dict, tokenizer_dir: str | Path, out: str | Path, dtype: Any = jnp.bfloat16):
    """Write `out/wuerstchen` and `out/wuerstchen-prior` in diffusers' layout (safetensors, configs, tokenizer)."""
    from wurst_jax.weights.export import export_component

    out = Path(out)
    mods = modules(cfg)
    dec, pri = out / "wuerstchen", out / "wuerstchen-prior"
    export_component(mods["decoder"], variables["decoder"], dec / "decoder", dtype)
    export_component(mods["vqgan"], variables["vqgan"], dec / "vqgan", dtype)
    export_component(mods["text"], variables["text_decoder"], dec / "text_encoder", dtype)
    export_component(mods["prior"], variables["prior"], pri / "prior", dtype)
    export_component(mods["text"], variables["text_prior"], pri / "text_encoder", dtype)
    scheduler = {"_class_name": "DDPMWuerstchenScheduler", "scaler": 1.0, "s": 0.008}
    for folder, index in (
        (dec, {"_class_name": "WuerstchenDecoderPipeline", "latent_dim_scale": cfg.latent_dim_scale}),
        (
            pri,
            {
                "_class_name": "WuerstchenPriorPipeline",
                "latent_mean": 1.0,
                "latent_std": 0.0,
                "resolution_multiple": cfg.resolution_multiple,
            },
        ),
    ):
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        defaults = {"default_size": cfg.size}
        if folder == dec:
            defaults["default_decoder_guidance"] = cfg.decoder_guidance
        (folder / "model_index.json").write_text(json.dumps({**index, **defaults}, indent=2))
        shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
    return dec, pri
