"""`wurst-jax train --stage c-controlnet --config FILE`: train a Stable Cascade stage C ControlNet with stage C
frozen, as the original's `train/train_c_controlnet.py`, on the fine-tune shards (`wurst_jax/train/finetune.py`).

The config is a fine-tune config (`init`: a Stable Cascade prior pipeline folder, `data`: `.npz` shards, the run
settings, `dtype`, `save_dtype`, `scan_blocks`, `remat` for stage C) plus a "controlnet" object
(`train/config.py` `controlnet_run`): `filter` ("canny", "inpaint" or "sr"), optionally `model` (ControlNetConfig
fields over the released preset of that filter) or `init` (a ControlNet folder to continue from), `effnet` (sr:
the EfficientNet encoder folder), `offset_noise`, `stage_c_dropout`, `p_outpaint`. Shards hold stage C's
`captions` and `image_embeddings` (stage C latents [N, h, w, 16], as they are: no scaling) and the `images`
(uint8 [N, H, W, 3]) the condition is made from, per batch: Canny edges and inpainting inputs on the host, the
sr embedding on the device. The inpainting masks are drawn per (seed, step, row): a random box to inpaint, or with
probability `p_outpaint` a random box to keep (outpainting); the original draws its inpainting masks from a
saliency model, which is not reproduced here. Text dropout is the run's `cond_dropout` (the original's 0.05).

Only the ControlNet trains (`controlnet/training.py`: the loss, `TRAINABLE`); stage C sits in the state's frozen
half in `dtype` and is never updated or saved in checkpoints. Checkpoints go to `out/ckpt_c-controlnet` (a run
resumes from them), metrics to `out/metrics.jsonl`, and at the end the ControlNet (EMA weights, `save_dtype`) to
`out/controlnet/`: `config.json` plus the original file layout (`backbone.*`, `projections.*`), which
`wurst-jax convert --stage controlnet` reads and the pipelines load as `controlnet=out/controlnet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.controlnet import filters
from wurst_jax.controlnet.training import TRAINABLE, controlnet_loss, controlnet_variables
from wurst_jax.pipelines.prompts import caption_tokens
from wurst_jax.train.config import CONTROL_FILTERS, FinetuneConfig
from wurst_jax.train.finetune import _DTYPES, load_parts
from wurst_jax.train.setup import build_train_setup
from wurst_jax.train.shards import Shards, shard_spec
from wurst_jax.train.state import Checkpoints, merge_params, train_loop

STAGE = "c-controlnet"


def new_controlnet(cfg: Any, seed: int) -> tuple[Any, dict]:
    """A fresh ControlNet (module, variables) for `cfg` (its output projections zero, as the original's)."""
    from wurst_jax.models.cascade.controlnet import StableCascadeControlNet

    module = StableCascadeControlNet(cfg)
    return module, jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 64, 64, cfg.c_in)))  # jit: op by op is slow


def inpaint_masks(size: tuple[int, int], n: int, seed: int, step: int, p_outpaint: float) -> np.ndarray:
    """bool [n, H, W] (True = to generate), a function of (seed, step): per row a box of 1/4 to 3/4 of each side
    at a random place, masked (inpainting) or, with probability `p_outpaint`, kept (outpainting)."""
    h, w = size
    rng = np.random.default_rng([seed, step, 17])
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        bh, bw = (max(1, int(side * rng.uniform(0.25, 0.75))) for side in (h, w))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        masks[i, top : top + bh, left : left + bw] = True
        if rng.uniform() < p_outpaint:
            masks[i] = ~masks[i]
    return masks


def host_condition(kind: str, images: np.ndarray, seed: int, step: int, p_outpaint: float) -> np.ndarray:
    """The condition of the host-side filters (canny, inpaint) for uint8 images [B, H, W, 3]; for sr the images
    as float32 [0, 1] (the encoder runs on the device, in `prepare`)."""
    if kind == "canny":
        return filters.canny(images)
    if kind == "inpaint":
        return filters.inpaint(images, inpaint_masks(images.shape[1:3], len(images), seed, step, p_outpaint))
    return filters.as_float_images(images)


def prepare_fn(kind: str, text: Any, effnet: Any) -> Any:
    """`prepare(frozen, raw) -> loss batch`: the frozen text encoder (and for sr the EfficientNet encoder)."""

    def prepare(frozen: dict, raw: dict) -> dict:
        out = text.apply(frozen["text_encoder"], raw["ids"], raw["mask"])
        condition = raw["condition"]
        if kind == "sr":
            condition = filters.super_resolution(effnet, frozen["effnet"], condition)[0]
        return {
            "latents": raw["latents"],
            "condition": condition,
            "clip_text": out.hidden_states_last,
            "clip_text_pooled": out.text_embeds[:, None],
        }

    return prepare


def train_controlnet(cfg: FinetuneConfig, log=print) -> tuple[Path, Any]:
    """Train the ControlNet of `cfg.controlnet` against the frozen stage C of `cfg.init` on `cfg.data` (resuming
    from `out/ckpt_c-controlnet`); returns (`out/controlnet`, the final train state)."""
    from wurst_jax.pipelines.components import resolve
    from wurst_jax.weights import export_component, load_component, read_config

    cn_run, run, out = cfg.controlnet, cfg.run, Path(cfg.out)
    root = resolve(cfg.init)
    missing = [p for p in ("prior", "text_encoder", "tokenizer") if not (root / p).is_dir()]
    if missing:
        raise ValueError(f"{root}: missing {missing}; stage c-controlnet trains from a prior pipeline folder")
    data = Shards(cfg.data, shard_spec(STAGE, {"prior": read_config(root / "prior")[1]}))
    for path in (cn_run.init, cn_run.effnet):
        if path is not None:
            read_config(path)  # a missing or foreign folder fails here, before any weights are read
    log(f"stage {STAGE}: training a {cn_run.filter} ControlNet on {data.total} samples in {len(data.files)} shards")

    dtype = _DTYPES[cfg.dtype]
    parts = load_parts(cfg, root, None)  # the prior in `dtype` too: it is frozen here
    unet, unet_vars = parts["prior"]
    unet = unet.clone(scan_blocks=cfg.scan_blocks, remat=cfg.remat)  # same parameters, other execution
    if cn_run.init is not None:
        cn, cn_vars = load_component(cn_run.init, dtype, jnp.float32)
        if cn.config.c_in != CONTROL_FILTERS[cn_run.filter]:
            raise ValueError(f"{cn_run.init}: a ControlNet with c_in={cn.config.c_in} cannot take {cn_run.filter}")
    else:
        cn, cn_vars = new_controlnet(cn_run.model, run.seed)
        cn = cn.clone(dtype=dtype)
    frozen = {"text_encoder": parts["text_encoder"][1]}
    effnet = None
    if cn_run.filter == "sr":
        effnet, frozen["effnet"] = load_component(cn_run.effnet, jnp.float32)
    tokenizer, (text, text_vars) = parts["tokenizer"], parts["text_encoder"]
    empty = jax.jit(text.apply)(text_vars, *caption_tokens(tokenizer, [""]))
    empty_text = (empty.hidden_states_last, empty.text_embeds[:, None])

    loss = controlnet_loss(unet, cn, cn_run.offset_noise, empty_text, run.cond_dropout, cn_run.stage_c_dropout)
    variables = controlnet_variables(unet_vars["params"], cn_vars)
    setup = build_train_setup(loss, variables, run, trainable=TRAINABLE)
    state = setup.state
    del variables, unet_vars, parts
    ckpts = Checkpoints(out / f"ckpt_{STAGE}")
    if ckpts.latest() is not None:
        state = ckpts.restore(state)
        log(f"stage {STAGE}: resumed at step {int(state.step)}")

    prepare = jax.jit(prepare_fn(cn_run.filter, text, effnet))

    def model_batch(k: int) -> dict:  # batch k: a function of (seed, k) alone
        raw = data.batch(k, run.batch_size, run.seed)
        ids, mask = caption_tokens(tokenizer, raw["captions"])
        cond = host_condition(cn_run.filter, raw["images"], run.seed, k, cn_run.p_outpaint)
        host = {"ids": ids, "mask": mask, "latents": raw["image_embeddings"], "condition": cond}
        return prepare(frozen, host)

    state = train_loop(
        state, setup.step, model_batch, run.steps, STAGE, ckpts, out / "metrics.jsonl", run.log_every,
        run.ckpt_every, log, run.max_seconds,
    )  # fmt: skip
    trained = {"params": merge_params(state.ema, state.frozen)["controlnet"]}
    if state.batch_stats:
        trained["batch_stats"] = state.batch_stats["controlnet"]
    folder = export_component(cn, trained, out / "controlnet", _DTYPES[cfg.save_dtype])
    log(f"stage {STAGE}: wrote {folder} (EMA weights, {cfg.save_dtype}; the original file layout)")
    return folder, state
