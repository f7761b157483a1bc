"""Fine-tune a converted or diffusers-layout Würstchen checkpoint on your own data: `wurst-jax train --stage c`
(or b, a) with a config that names an `init` pipeline folder and a `data` folder of `.npz` shards.

What trains (the rest is frozen, as in diffusers' `train_text_to_image_prior.py`):
- c: the prior (Stage C). `init` is a prior pipeline folder (prior/, text_encoder/, tokenizer/, model_index.json).
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
Other keys are ignored, so one set of shards can serve all three stages. Every shard is checked before
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

import dataclasses
import functools
import json
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.train import objectives
from wurst_jax.train.state import (
    Checkpoints,
    batch_sharding,
    create_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
    state_shardings,
    train_loop,
)
from wurst_jax.tiny.recipe import RunConfig, caption_tokens

STAGES = ("a", "b", "c")
COMPONENT = {"c": "prior", "b": "decoder", "a": "vqgan"}  # the folder each stage trains
PARTS = {  # what each stage loads from `init`
    "c": ("prior", "text_encoder", "tokenizer"),
    "b": ("decoder", "vqgan", "text_encoder", "tokenizer"),
    "a": ("vqgan",),
}
FINETUNE_KEYS = ("init", "data", "dtype", "save_dtype", "sharding", "scan_blocks", "remat")
BLOCK_OPTIONS = ("scan_blocks", "remat")  # execution options of the prior and the decoder: stages c and b
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_RUN_ARTEFACTS = ("ckpt_", "metrics.jsonl", ".")  # never copied from `init` (it may be an earlier run's out/)
_TMP = ".pipeline.tmp"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    stage: str
    init: str
    data: str
    out: str
    run: RunConfig
    dtype: str = "float32"  # compute dtype
    save_dtype: str = "float32"  # dtype of the exported component
    sharding: str | None = None  # "dp" or "fsdp" over all devices; None: one device
    scan_blocks: bool = False  # stages c, b: repeated blocks as one lax.scan (one repeat compiled)
    remat: bool = False  # stages c, b: recompute each repeat in the backward pass (less activation memory)


def is_finetune(raw: dict) -> bool:
    """A config with "init" (top level or in a stage section) fine-tunes; without, it trains the tiny model."""
    if not isinstance(raw, dict):
        return False
    return "init" in raw or any(isinstance(v, dict) and "init" in v for v in raw.values())


def finetune_config(raw: dict, stage: str, name: str = "config") -> FinetuneConfig:
    """Check a fine-tune config (settings at top level, overridden by the stage's section) and build it."""
    if stage not in STAGES:
        raise ValueError(f"{name}: fine-tuning (a config with 'init') trains stage a, b or c, not {stage!r}")
    run_keys = {f.name for f in dataclasses.fields(RunConfig)} - {"data_workers"}  # no rendering: shards are read
    known = run_keys | set(FINETUNE_KEYS)
    unknown = set(raw) - known - {"out", *STAGES}
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)} for a fine-tune; known: {sorted(known | {'out'})}")
    for s in STAGES:
        section = raw.get(s, {})
        if not isinstance(section, dict) or set(section) - known:
            bad = sorted(set(section) - known) if isinstance(section, dict) else section
            raise ValueError(f"{name}: section {s!r}: unknown keys {bad}; known: {sorted(known)}")
    merged = {**{k: v for k, v in raw.items() if k in known}, **raw.get(stage, {})}
    for key in ("init", "data"):
        if key not in merged:
            raise ValueError(f"{name}: fine-tuning stage {stage} needs {key!r}")
    for key in ("dtype", "save_dtype"):
        if merged.get(key, "float32") not in _DTYPES:
            raise ValueError(f"{name}: {key!r} must be one of {sorted(_DTYPES)}, got {merged[key]!r}")
    for key in BLOCK_OPTIONS:
        if not isinstance(merged.get(key, False), bool):
            raise ValueError(f"{name}: {key!r} must be true or false, got {merged[key]!r}")
        if merged.get(key) and stage == "a":
            raise ValueError(f"{name}: {key!r} is an option of the prior and the decoder (stages c, b), not stage a")
    if merged.get("sharding") not in (None, "dp", "fsdp"):
        raise ValueError(f"{name}: 'sharding' must be 'dp' or 'fsdp', got {merged['sharding']!r}")
    if "out" not in raw:
        raise ValueError(f"{name}: needs an 'out' folder")
    out, init = Path(raw["out"]).resolve(), Path(merged["init"]).resolve()
    if out == init or init in out.parents:
        raise ValueError(f"{name}: 'out' ({raw['out']}) must be a folder outside 'init' ({merged['init']})")
    run = RunConfig(**{k: v for k, v in merged.items() if k in run_keys})
    extra = {k: merged[k] for k in FINETUNE_KEYS if k in merged and k not in ("init", "data")}
    return FinetuneConfig(stage, str(merged["init"]), str(merged["data"]), str(raw["out"]), run, **extra)


# ---------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What a stage needs from a shard: key → (number of dims with N, last-dim size or None, kind)."""

    arrays: dict[str, tuple[int, int | None, str]]
    multiple: int = 1  # H and W of `images` must be multiples of this


def shard_spec(stage: str, configs: dict[str, Any]) -> ShardSpec:
    """From the component configs (`read_config` of the init folders), before any weights are read."""
    if stage == "c":
        return ShardSpec({"captions": (1, None, "U"), "image_embeddings": (4, configs["prior"].c_in, "f")})
    vq = configs["vqgan"]
    factor = vq.up_down_scale_factor * 2 ** (vq.levels - 1)
    if stage == "a":
        return ShardSpec({"images": (4, 3, "u1")}, factor)
    dec = configs["decoder"]
    arrays = {"captions": (1, None, "U"), "images": (4, 3, "u1"), "image_embeddings": (4, dec.effnet_embd, "f")}
    return ShardSpec(arrays, factor * dec.downscale)


def _read_shard(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys if k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz shard without pickled objects ({e})") from None


def check_shard(path: Path, arrays: dict[str, np.ndarray], spec: ShardSpec) -> int:
    """Raise a ValueError naming `path` and what was expected; returns the shard's N."""
    want = ", ".join(f"{k} [N{', …' * (d - 1)}{f', {c}' if c else ''}]" for k, (d, c, _) in spec.arrays.items())
    missing = [k for k in spec.arrays if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing {missing}; a shard for this stage holds {want}")
    sizes = {}
    for key, (ndim, channels, kind) in spec.arrays.items():
        x = arrays[key]
        if x.ndim != ndim or (channels is not None and x.shape[-1] != channels):
            raise ValueError(
                f"{path}: {key} has shape {x.shape}, expected {ndim} dims"
                + (f" ending in {channels} channels (NHWC)" if channels else "")
            )
        if kind == "U" and x.dtype.kind != "U":
            raise ValueError(f"{path}: {key} has dtype {x.dtype}, expected strings (np.array(list_of_str))")
        if kind == "u1" and x.dtype != np.uint8:
            raise ValueError(f"{path}: {key} has dtype {x.dtype}, expected uint8 RGB in [0, 255]")
        if kind == "f":
            if x.dtype.kind != "f":
                raise ValueError(f"{path}: {key} has dtype {x.dtype}, expected a float array")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{path}: {key} holds {int(np.sum(~np.isfinite(x)))} non-finite values (NaN / inf)")
        if key == "images" and (x.shape[1] % spec.multiple or x.shape[2] % spec.multiple):
            raise ValueError(
                f"{path}: images are {x.shape[1]}×{x.shape[2]}; H and W must be multiples of {spec.multiple}"
            )
        sizes[key] = x.shape[0]
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"{path}: every array needs the same N > 0 samples; got {sizes}")
    return next(iter(sizes.values()))


class Shards:
    """The `.npz` shards of a folder, checked up front; `batch(k, ...)` is batch k of an endless shuffled stream."""

    def __init__(self, folder: str | Path, spec: ShardSpec, cache: int = 2):
        folder = Path(folder)
        self.files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
        if not self.files:
            raise ValueError(f"{folder}: no .npz shards (expected a folder of files holding {sorted(spec.arrays)})")
        self.keys, self.sizes, shapes = list(spec.arrays), [], {}
        for path in self.files:
            arrays = _read_shard(path, self.keys)
            self.sizes.append(check_shard(path, arrays, spec))
            for key in self.keys:
                first = shapes.setdefault(key, (path, arrays[key].shape[1:]))
                if key != "captions" and arrays[key].shape[1:] != first[1]:
                    raise ValueError(
                        f"{path}: {key} is {arrays[key].shape[1:]} per sample but {first[0].name} has {first[1]}; "
                        "all shards of a run share one resolution"
                    )
        self.total = sum(self.sizes)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_size = cache

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one Shards per run)
    def _epoch(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative end offsets in that order) of one epoch."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.files))
        return order, np.cumsum([self.sizes[i] for i in order])

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def _rows(self, seed: int, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch, shard]).permutation(self.sizes[shard])

    def rows(self, k: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
        """(shard, row) of each sample of batch k."""
        out = []
        for p in range(k * batch_size, (k + 1) * batch_size):
            epoch, offset = divmod(p, self.total)
            order, ends = self._epoch(seed, epoch)
            j = int(np.searchsorted(ends, offset, side="right"))
            shard = int(order[j])
            out.append((shard, int(self._rows(seed, epoch, shard)[offset - (ends[j - 1] if j else 0)])))
        return out

    def _load(self, shard: int) -> dict:
        if shard not in self._cache:
            self._cache[shard] = _read_shard(self.files[shard], self.keys)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard]

    def batch(self, k: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """Batch k: {key: [batch_size, ...]}, images as float32 in [0, 1]."""
        picked = [(self._load(s), r) for s, r in self.rows(k, batch_size, seed)]
        out = {key: np.stack([a[key][r] for a, r in picked]) for key in self.keys}
        if "images" in out:
            out["images"] = out["images"].astype(np.float32) / 255.0
        if "image_embeddings" in out:
            out["image_embeddings"] = out["image_embeddings"].astype(np.float32)
        return out


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
        param_dtype = jnp.float32 if part == COMPONENT[cfg.stage] else dtype
        out[part] = load_component(root / part, dtype, param_dtype, mesh=mesh, sharding=cfg.sharding)
    return out


def host_batch(stage: str, raw: dict, tokenizer: Any, latent_mean: float, latent_std: float) -> dict:
    """Shard rows (`Shards.batch`) → the host arrays `prepare` takes."""
    if stage == "a":
        return {"images": raw["images"]}
    ids, mask = caption_tokens(tokenizer, raw["captions"])
    if stage == "c":  # back to the prior's own space, as diffusers' script: (x + std) / mean
        return {"ids": ids, "mask": mask, "latents": (raw["image_embeddings"] + latent_std) / latent_mean}
    return {"ids": ids, "mask": mask, "images": raw["images"], "image_embeddings": raw["image_embeddings"]}


def prepare_fn(stage: str, parts: dict) -> Any:
    """`prepare(frozen, raw) -> model batch`: the frozen encoders' work, outside the differentiated step."""

    def prepare(frozen, raw):
        if stage == "a":
            return {"images": raw["images"]}
        text = parts["text_encoder"][0]
        out = {"clip": text.apply(frozen["text_encoder"], raw["ids"], raw["mask"])}
        if stage == "c":
            return {**out, "latents": raw["latents"]}
        vqgan = parts["vqgan"][0]
        latents = vqgan.apply(frozen["vqgan"], raw["images"], method="encode") / vqgan.config.scale_factor
        return {**out, "latents": latents, "effnet": raw["image_embeddings"]}

    return prepare


def loss_fn(stage: str, module: Any, run: RunConfig, empty_clip: np.ndarray | None) -> Any:
    """`loss(params, batch_stats, rng, batch) -> (loss, aux)` of the trained component."""
    if stage == "a":
        return lambda params, stats, rng, batch: objectives.stage_a_loss(
            module, {"params": params, "batch_stats": stats}, batch["images"]
        )
    if stage == "b":

        def loss(params, stats, rng, batch):
            args = (batch["latents"], batch["effnet"], batch["clip"], empty_clip, run.cond_dropout)
            return objectives.stage_b_loss(module, params, rng, *args), {}

        return loss

    def loss(params, stats, rng, batch):
        r_drop, rng = jax.random.split(rng)
        clip = objectives.drop_text(r_drop, batch["clip"], empty_clip, run.cond_dropout)
        latents = batch["latents"]
        return objectives.stage_c_loss(module, params, rng, latents, clip, weighting=run.loss_weighting), {}

    return loss


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
    from wurst_jax.pipeline_io import resolve
    from wurst_jax.sharding import make_mesh
    from wurst_jax.weights import read_config

    stage, run, out = cfg.stage, cfg.run, Path(cfg.out)
    root = resolve(cfg.init)
    missing = [p for p in PARTS[stage] if not (root / p).is_dir()]
    if missing:
        what = "prior" if stage == "c" else "decoder"
        raise ValueError(f"{root}: missing {missing}; stage {stage} fine-tunes from a {what} pipeline folder")
    configs = {p: read_config(root / p)[1] for p in PARTS[stage] if p != "tokenizer"}  # WeightsError: a ValueError
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
    empty_clip = None
    if tokenizer is not None:
        text, text_vars = parts["text_encoder"]
        empty_clip = np.asarray(jax.jit(text.apply)(text_vars, *caption_tokens(tokenizer, [""])), np.float32)

    tx = make_optimizer(run.lr, run.warmup_steps)
    params, stats = variables["params"], variables.get("batch_stats", {})
    init = lambda p, s: create_state(p, tx, run.seed, s)  # noqa: E731
    if mesh is None:
        # committed to one device: a mix of committed and uncommitted leaves would compile the step twice
        state, state_sh = jax.device_put(init(params, stats), jax.devices()[0]), None
    else:
        from wurst_jax.models import abstract_variables

        boxed = abstract_variables(module, boxed=True)["params"]
        state_sh = state_shardings(jax.eval_shape(init, params, stats), boxed, mesh, cfg.sharding)
        state = jax.jit(init, out_shardings=state_sh)(params, stats)
    del params, stats, variables
    ckpts = Checkpoints(out / f"ckpt_{stage}")
    if ckpts.latest() is not None:
        state = ckpts.restore(state)
        log(f"stage {stage}: resumed at step {int(state.step)}")

    prepare = jax.jit(prepare_fn(stage, parts))

    def place(tree: dict) -> dict:  # split the batch axis over "data" (one device: as is)
        return tree if mesh is None else jax.device_put(tree, jax.tree_util.tree_map(batch_sharding(mesh), tree))

    def model_batch(k: int) -> dict:  # batch k: a function of (seed, k) alone
        host = host_batch(stage, data.batch(k, run.batch_size, run.seed), tokenizer, latent_mean, latent_std)
        return place(prepare(frozen, place(host)))

    compiled = []  # the step is jitted at the first batch, whose shardings it takes

    def step_fn(state, batch):
        if not compiled:
            batch_sh = None if mesh is None else jax.tree_util.tree_map(lambda x: x.sharding, batch)
            step = make_train_step(loss_fn(stage, module, run, empty_clip), tx, run.ema_decay)
            compiled.append(jit_train_step(step, state_sh, batch_sh))
        return compiled[0](state, batch)

    state = train_loop(
        state,
        step_fn,
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

    trained = {"params": state.ema, **({"batch_stats": state.batch_stats} if stage == "a" else {})}
    write_pipeline(root, out, COMPONENT[stage], module, trained, _DTYPES[cfg.save_dtype])
    log(f"stage {stage}: wrote {out / COMPONENT[stage]} (EMA weights, {cfg.save_dtype}) and the pipeline in {out}")
    return out
