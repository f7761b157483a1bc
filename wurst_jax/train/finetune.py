"""Fine-tune a converted or diffusers-layout Würstchen checkpoint on your own data: `wurst-jax train --stage c`
(or b, a) with a config that names an `init` pipeline folder and a `data` folder of `.npz` shards.

What trains (the rest is frozen, as in diffusers' `train_text_to_image_prior.py`):
- c: the prior (Stage C). `init` is a prior pipeline folder (prior/, text_encoder/, tokenizer/, model_index.json),
  Würstchen v2's or Stable Cascade's (whose prior learns `image_embeddings` as they are, conditioned on the text
  encoder's last layer before its norm and its pooled embedding, no image; with `lora_rank`, the original Stable
  Cascade LoRA on '.attn', saved as its `lora.safetensors`, and with `train_tokens` its ReToken rows too: the
  text encoder then runs inside the loss on the captions' token ids, `lora/retoken_train.py`). A LoRA trains
  with `sharding` as everything else does (the adapter replicated, see `finetune`).
- b: the decoder (Stage B). `init` is a decoder pipeline folder (decoder/, vqgan/, text_encoder/, tokenizer/).
- a: the VQGAN (Stage A; reconstruction + codebook losses). `init` is a decoder pipeline folder (vqgan/).
Components may be diffusers / transformers safetensors or folders converted by `wurst-jax convert` (orbax).
The trained component is loaded with f32 master weights and `dtype` compute; frozen ones in `dtype`.

Shards: every `*.npz` file directly in `data` (sorted by name), each holding N samples (`wurst-jax prepare-data`,
`wurst_jax/train/prepare.py`, makes them from a folder of captioned images):
- `captions`: str [N] (`np.array(list_of_str)`, not an object array); stages c and b (optional for a).
- `image_embeddings`: float [N, h, w, C] NHWC, stages c and b. The decoder-space semantic latents, i.e. what
  `WuerstchenPriorPipeline` outputs (EfficientNet features for the real model; C = the prior's `c_in`, 16).
  Stage C learns `(image_embeddings + latent_std) / latent_mean` (model_index.json of `init`; diffusers'
  defaults 42 and 1, the `image_embeds.add(1.0).div(42.0)` of diffusers' script).
- `images`: uint8 [N, H, W, 3] RGB, stages b and a. Stage B's targets are the frozen VQGAN's `encode(images)`
  divided by its `scale_factor`; H and W must be multiples of the VQGAN's 4 (stage a) and of 4 × the decoder's
  `downscale` (stage b).
Other keys are ignored, so one set of shards can serve all three stages. Every shard is checked (`shards.py`) before
training starts (keys, ndim, channels, N, dtype, finite values, one per-sample shape across all shards); a bad
one raises a ValueError naming the file. Each epoch visits the shards in a shuffled order and the rows of each
shard shuffled, both drawn from (seed, epoch), so batch k is a function of (seed, k) alone and a resumed run
sees exactly the batches it would have seen. At most two shards are held in memory.

Output: checkpoints in `out/ckpt_<stage>` (resumed from when present), `out/metrics.jsonl`, and at the end
`out/` as a pipeline folder: the fine-tuned component (EMA weights, diffusers safetensors in `save_dtype`) plus a
copy of the rest of `init`. It is published through `out/.pipeline.tmp`: `model_index.json` is removed first and
moved in last, so a folder with a `model_index.json` is always complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.models.cascade import StableCascadeUNet
from wurst_jax.models.clip_text import CLIPTextOutput
from wurst_jax.pipelines.prompts import caption_tokens
from wurst_jax.train import objectives
from wurst_jax.train.config import FinetuneConfig
from wurst_jax.train.setup import build_train_setup
from wurst_jax.train.shards import Shards, shard_spec
from wurst_jax.train.state import Checkpoints, batch_sharding, merge_params, train_loop

COMPONENT = {"c": "prior", "b": "decoder", "a": "vqgan"}  # the folder each stage trains
PARTS = {  # what each stage loads from `init`
    "c": ("prior", "text_encoder", "tokenizer"),
    "b": ("decoder", "vqgan", "text_encoder", "tokenizer"),
    "a": ("vqgan",),
    "c-controlnet": ("prior", "text_encoder", "tokenizer"),  # all frozen: the ControlNet trains (controlnet/train.py)
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_RUN_ARTEFACTS = ("ckpt_", "metrics.jsonl", ".")  # never copied from `init` (it may be an earlier run's out/)
_TMP = ".pipeline.tmp"


# ---------------------------------------------------------------- models and losses


def load_parts(cfg: FinetuneConfig, root: Path, mesh: Any) -> dict[str, Any]:
    """{part: (module, variables)} (tokenizer: the tokenizer); the trained part with f32 master weights."""
    from transformers import AutoTokenizer

    from wurst_jax.weights import load_component

    dtype = _DTYPES[cfg.dtype]
    out = {}
    for part in PARTS[cfg.stage]:
        if part == "tokenizer":
            out[part] = AutoTokenizer.from_pretrained(str(root / part))
            continue
        param_dtype = jnp.float32 if part == COMPONENT.get(cfg.stage) else dtype
        out[part] = load_component(root / part, dtype, param_dtype, mesh=mesh, sharding=cfg.sharding)
    return out


def host_batch(stage: str, raw: dict, tokenizer: Any, latent_mean: float, latent_std: float, cascade=False) -> dict:
    """Shard rows (`Shards.batch`) → the host arrays `prepare` takes."""
    if stage == "a":
        return {"images": raw["images"]}
    ids, mask = caption_tokens(tokenizer, raw["captions"])
    if stage == "c" and cascade:  # Stable Cascade's prior works in the effnet space itself (no mapping)
        return {"ids": ids, "mask": mask, "latents": raw["image_embeddings"]}
    if stage == "c":  # back to the prior's own space, as diffusers' script: (x + std) / mean
        return {"ids": ids, "mask": mask, "latents": (raw["image_embeddings"] + latent_std) / latent_mean}
    return {"ids": ids, "mask": mask, "images": raw["images"], "image_embeddings": raw["image_embeddings"]}


def prepare_fn(stage: str, parts: dict) -> Any:
    """`prepare(frozen, raw) -> model batch`: the frozen encoders' work, outside the differentiated step."""

    def prepare(frozen, raw):
        if stage == "a":
            return {"images": raw["images"]}
        text = parts["text_encoder"][0]
        states = text.apply(frozen["text_encoder"], raw["ids"], raw["mask"])
        if isinstance(states, CLIPTextOutput):  # Stable Cascade: the last layer before the norm, and the pooled
            return {"text": states.hidden_states_last, "pooled": states.text_embeds[:, None], "latents": raw["latents"]}
        out = {"clip": states}
        if stage == "c":
            return {**out, "latents": raw["latents"]}
        vqgan = parts["vqgan"][0]
        latents = vqgan.apply(frozen["vqgan"], raw["images"], method="encode") / vqgan.config.scale_factor
        return {**out, "latents": latents, "effnet": raw["image_embeddings"]}

    return prepare


# ---------------------------------------------------------------- output


def write_pipeline(root: Path, out: Path, component: str, module: Any, variables: Any, dtype: Any) -> Path:
    """`out/` as a pipeline folder: `component` exported from `variables`, the rest of `root` copied."""
    from wurst_jax.weights import export_component

    tmp = out / _TMP
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in sorted(root.iterdir()):
        if entry.name == component or entry.name.startswith(_RUN_ARTEFACTS):
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    export_component(module, variables, tmp / component, dtype)
    index = out / "model_index.json"
    index.unlink(missing_ok=True)  # the folder is no pipeline while its parts are swapped
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        dest = out / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        entry.rename(dest)
    tmp.rmdir()
    return out


# ---------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig, log=print) -> Path:
    """Fine-tune `cfg.stage` from `cfg.init` on `cfg.data` (resuming from `out/ckpt_<stage>`); returns `out`."""
    from wurst_jax.pipelines.components import resolve
    from wurst_jax.sharding import make_mesh
    from wurst_jax.weights import read_config

    stage, run, out = cfg.stage, cfg.run, Path(cfg.out)
    root = resolve(cfg.init)
    missing = [p for p in PARTS[stage] if not (root / p).is_dir()]
    if missing:
        what = "prior" if stage == "c" else "decoder"
        raise ValueError(f"{root}: missing {missing}; stage {stage} fine-tunes from a {what} pipeline folder")
    kinds = {p: read_config(root / p) for p in PARTS[stage] if p != "tokenizer"}  # WeightsError: a ValueError
    configs = {p: config for p, (_, config) in kinds.items()}
    if cfg.train_tokens and kinds["prior"][0] != "cascade_unet":
        raise ValueError(f"{root}: 'train_tokens' trains ReToken rows beside a Stable Cascade prior's LoRA, not v2's")
    retoken = None  # the ReToken ids with `train_tokens`
    if cfg.train_tokens:  # the tokens checked against the tokenizer before any weights are read
        from wurst_jax.lora import retoken_train as rt
        from wurst_jax.pipelines.tokenizer import load_tokenizer

        base_tokenizer = load_tokenizer(root / "tokenizer")
        grown_tokenizer, retoken = rt.plan(base_tokenizer, cfg.train_tokens)
    data = Shards(cfg.data, shard_spec(stage, configs))  # checked before any weights are read
    mesh = make_mesh() if cfg.sharding else None
    if mesh is not None and run.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size {run.batch_size} must divide over the {mesh.shape['data']} devices")
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    latent_mean, latent_std = float(index.get("latent_mean", 42.0)), float(index.get("latent_std", 1.0))
    log(f"stage {stage}: fine-tuning {root / COMPONENT[stage]} on {data.total} samples in {len(data.files)} shards")

    parts = load_parts(cfg, root, mesh)
    module, variables = parts[COMPONENT[stage]]
    if stage != "a":  # same parameter tree, other execution
        module = module.clone(scan_blocks=cfg.scan_blocks, remat=cfg.remat)
    frozen = {p: v[1] for p, v in parts.items() if p not in (COMPONENT[stage], "tokenizer")}
    tokenizer = parts.get("tokenizer")
    empty_clip: Any = None
    cascade = isinstance(module, StableCascadeUNet)  # a Stable Cascade prior folder
    if tokenizer is not None and not cfg.train_tokens:  # (ReToken: the loss encodes the empty prompt itself)
        text, text_vars = parts["text_encoder"]
        states = jax.jit(text.apply)(text_vars, *caption_tokens(tokenizer, [""]))
        if cascade:
            empty_clip = {"text": states.hidden_states_last, "pooled": states.text_embeds[:, None]}
            empty_clip = {k: np.asarray(v, np.float32) for k, v in empty_clip.items()}
        else:
            empty_clip = np.asarray(states, np.float32)

    loss: Any = None  # ReToken: `retoken_loss` below
    if not cfg.train_tokens:
        loss = objectives.component_loss(stage, module, empty_clip, run.cond_dropout, run.loss_weighting)
    trainable: Any = True
    submodules: dict = {}
    if cfg.lora_rank:  # adapter leaves beside the frozen kernels; only they train (and sit in the optimizer).
        # With `sharding` the frozen kernels are split as in a full fine-tune, while the adapter leaves (not the
        # module's parameters: `state_shardings` finds no spec for them) are replicated with their EMA and Adam
        # moments: r·(in + out) values a layer, so every device merges `kernel + down @ up` from its own copy and
        # no step gathers an adapter; splitting them like their kernel would save little memory for a gather each
        from wurst_jax.lora.train import add_lora, is_lora, lora_loss

        style = "cascade" if cascade else "peft"  # Stable Cascade: the original's parametrisation and file
        variables = {"params": add_lora(variables["params"], cfg.lora_rank, cfg.lora_targets, run.seed, style)}
        loss, trainable = lora_loss(loss), is_lora
    if cfg.train_tokens:  # ReToken rows too: the text encoder runs in the loss (its weights frozen in the state)
        text, text_vars = parts["text_encoder"]
        text, text_params = rt.grow(base_tokenizer, text, text_vars["params"], cfg.train_tokens)
        variables = {"params": {**variables["params"], rt.TEXT: rt.with_rows(text_params, len(retoken))}}
        tokenizer = grown_tokenizer  # the captions' ids: the new tokens as one id each
        empty = caption_tokens(tokenizer, [""])
        loss = rt.retoken_loss(module, text, retoken, *empty, run.cond_dropout, run.loss_weighting)
        trainable, submodules = rt.trainable, {rt.TEXT: text}
        words = ", ".join(repr(tokenizer.decode([i])) for i in retoken)
        log(f"stage c: training ReToken rows for token ids {retoken.tolist()} ({words})")
    setup = build_train_setup(
        loss, variables, run, module=module, mesh=mesh, mode=cfg.sharding or "dp", trainable=trainable,
        submodules=submodules,
    )  # fmt: skip
    state = setup.state
    del variables, parts[COMPONENT[stage]]  # the state holds the trained weights now
    ckpts = Checkpoints(out / f"ckpt_{stage}")
    if ckpts.latest() is not None:
        state = ckpts.restore(state)
        log(f"stage {stage}: resumed at step {int(state.step)}")

    prepare = jax.jit(prepare_fn(stage, parts))

    def place(tree: dict) -> dict:  # split the batch axis over "data" (one device: as is)
        return tree if mesh is None else jax.device_put(tree, jax.tree_util.tree_map(batch_sharding(mesh), tree))

    def model_batch(k: int) -> dict:  # batch k: a function of (seed, k) alone
        host = host_batch(stage, data.batch(k, run.batch_size, run.seed), tokenizer, latent_mean, latent_std, cascade)
        if retoken is not None:  # the text encoder runs in the loss, on the captions' ids
            return place(host)
        return place(prepare(frozen, place(host)))

    state = train_loop(
        state,
        setup.step,
        model_batch,
        run.steps,
        stage,
        ckpts,
        out / "metrics.jsonl",
        run.log_every,
        run.ckpt_every,
        log,
        run.max_seconds,
    )

    if cfg.lora_rank and cascade:  # the original Stable Cascade `lora.safetensors` (its code loads it)
        from wurst_jax.lora.cascade_format import write_file
        from wurst_jax.lora.train import cascade_weights

        token_dim = parts["text_encoder"][0].config.hidden_size
        params = merge_params(state.ema, state.frozen)
        if retoken is not None:
            path = write_file(out, cascade_weights(rt.prior_of(params)), token_dim, rt.rows_of(params, retoken))
        else:
            path = write_file(out, cascade_weights(params), token_dim)
        log(f"stage c: wrote the Stable Cascade LoRA (EMA, rank {cfg.lora_rank}, '.attn') to {path}")
        return out
    if cfg.lora_rank:
        from wurst_jax.lora import write_lora_file
        from wurst_jax.lora.train import adapter_of

        path = write_lora_file(out, {"prior": adapter_of(merge_params(state.ema, state.frozen))})
        log(f"stage c: wrote the LoRA (EMA, rank {cfg.lora_rank}, {cfg.lora_targets}) to {path}")
        return out
    trained = {"params": merge_params(state.ema, state.frozen)}  # the EMA of what trained, the rest as it was
    trained.update({"batch_stats": state.batch_stats} if stage == "a" else {})
    write_pipeline(root, out, COMPONENT[stage], module, trained, _DTYPES[cfg.save_dtype])
    log(f"stage {stage}: wrote {out / COMPONENT[stage]} (EMA weights, {cfg.save_dtype}) and the pipeline in {out}")
    return out
