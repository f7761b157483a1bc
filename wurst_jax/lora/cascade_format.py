"""Original Stable Cascade LoRA files (Stability-AI/StableCascade `modules/lora.py`, `train/train_c_lora.py`) ↔
adapters (`adapter.py`).

The original training wraps every weight of a stage C module whose name contains one of `module_filters` (its
configs: `['.attn']`) in a parametrisation `W + (lora_up @ lora_down) · alpha / rank` (alpha 1, so the scale is
1 / rank): `nn.Linear.weight` [out, in], and `nn.MultiheadAttention.in_proj_weight` [3C, C] as one matrix (one
`lora_down` [r, C] shared by q, k and v, one `lora_up` [3C, r]). It saves `lora.safetensors`, the state dict of
`ModuleDict(embeddings=ReToken, weights=ModuleList(every LoRA in generator.modules() order))`:

- `weights.<i>.lora_down` [r, in], `weights.<i>.lora_up` [out, r]: the i-th adapted module in the original stage
  C's module order (down blocks, then up blocks; in an attention, `attn.out_proj` comes before `attn`'s in_proj,
  because the parametrisation module registered on `attn` is a child added after `out_proj`).
- `embeddings.embeddings` [n, D], `embeddings.indices` [n]: `ReToken`, rows ADDED to the CLIP text encoder's token
  embedding at those token ids (the original adds, it does not replace). Ids from the vocabulary on are tokens the
  original training appended (`[name]` / `<name>` train tokens, initialised from a regex the file does not hold):
  they need the train tokens (`tokens.py`, `load_lora_weights(..., train_tokens=...)`), which add them first.

As adapters: each site's delta is `down @ up` in [in, out] (the 1 / rank folded into `up`; in_proj split into
to_q / to_k / to_v, the project's names), and ReToken is a rank-n adapter of the embedding table (one-hot down
[V, n] @ rows up [n, D]), so fusing, scales and several adapters work the same for both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import traverse_util

from wurst_jax.lora.adapter import Adapter, check_against
from wurst_jax.weights import layout, mapping

FILE_NAME = "lora.safetensors"  # `models_to_save = ['lora']` + the original's default checkpoint extension
DEFAULT_FILTERS = (".attn",)
_WEIGHT = re.compile(r"^weights\.(\d+)\.(lora_down|lora_up)$")
_EMBEDDINGS = ("embeddings.embeddings", "embeddings.indices")
# the original StageC's module registration order (state-dict order) of the names our sort has to rank
_ORDER = {
    name: i
    for i, name in enumerate(
        "clip_txt_mapper clip_txt_pooled_mapper clip_img_mapper clip_norm embedding down_blocks down_downscalers "
        "down_repeat_mappers up_blocks up_upscalers up_repeat_mappers clf depthwise norm channelwise attention attn "
        "out_proj in_proj kv_mapper mapper mapper_sca mapper_crp".split()
    )
}


def is_cascade_file(keys: Any) -> bool:
    """Whether a state dict's keys are the original Stable Cascade LoRA's (rather than diffusers/PEFT ones)."""
    return any(_WEIGHT.match(k) or k in _EMBEDDINGS for k in keys)


@dataclass(frozen=True)
class Site:
    """One module the original adapts: its original name, and the kernels it covers here (q, k, v for in_proj)."""

    name: str
    paths: tuple[tuple[str, ...], ...]

    @property
    def in_proj(self) -> bool:
        return len(self.paths) == 3


def _order_key(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, _ORDER.get(p, len(_ORDER)), p) for p in name.split("."))


def sites(tree: Any, filters: Any = DEFAULT_FILTERS) -> tuple[list[Site], list[str]]:
    """(the LoRA sites of a stage C variable tree matching `filters`, in the original's order; the matching
    modules this format cannot adapt here: convolutions)."""
    found, unsupported = [], []
    flat = traverse_util.flatten_dict(dict(tree))
    for path, leaf in flat.items():
        if path[-1] != "kernel":
            continue
        torch_name = layout.torch_key(path)
        if torch_name is None:
            continue
        module = torch_name.removesuffix(".weight")
        head, _, last = module.rpartition(".attention.")
        if head and last in ("to_k", "to_v"):
            continue  # one in_proj site, found at to_q
        # the original name (MultiheadAttention's in_proj / out_proj), mapped forward again by the converter's
        # original → diffusers rules (`mapping.canonical_source`): the kernels a site covers are the ones
        # stage_c.safetensors' tensor of that name loads into
        if head and last == "to_q":
            name, key, rows = f"{head}.attention.attn", f"{head}.attention.attn.in_proj_weight", 3
        elif head and last == "to_out.0":
            name, key, rows = f"{head}.attention.attn.out_proj", f"{head}.attention.attn.out_proj.weight", 1
        else:
            name, key, rows = module, torch_name, 1
        paths = _loaded_into(key, rows, flat)
        if paths is None:
            continue
        if filters is not None and not any(f in name for f in filters):
            continue
        (found if len(getattr(leaf, "shape", ())) == 2 else unsupported).append(Site(name, paths))
    # in_proj's LoRA is a child of `attn` registered after `out_proj`: rank it as `attn.in_proj`
    key = lambda s: _order_key(s.name + (".in_proj" if s.in_proj else ""))  # noqa: E731
    return sorted(found, key=key), sorted(s.name for s in unsupported)


def _loaded_into(key: str, rows: int, flat: dict) -> tuple[tuple[str, ...], ...] | None:
    """The kernel paths an original tensor `key` (of `rows` stacked matrices) loads into, None if not all exist."""
    refs = mapping.canonical_source({key: mapping.TensorRef((rows, 1), lambda: None)})
    paths = []
    for torch_key in refs:
        cands = [c for c in layout.flax_candidates(torch_key) if c in flat]
        if not cands:
            return None
        paths.append(cands[0])
    return tuple(paths)


def _token_embedding(tree: Any) -> tuple[str, ...] | None:
    for path in traverse_util.flatten_dict(dict(tree)):
        if path[-2:] == ("token_embedding", "embedding"):
            return path
    return None


def from_state_dict(
    tensors: dict[str, Any],
    targets: dict[str, Any],
    where: str = "LoRA",
    module_filters: Any = None,
    added: tuple[int, int, int] | None = None,
) -> dict[str, Adapter]:
    """The adapters of an original Stable Cascade LoRA state dict: {"prior": ..., "text_encoder": ...} (the latter
    only with ReToken rows). `targets` are the pipeline's variable trees (or their shapes); every unknown, missing or
    mis-shaped key is listed in one `LoraError` and nothing is returned. `added` = (the tokenizer's own vocabulary,
    the table row this file's added tokens start at, their count): the file's ids vocab + k are row start + k (the
    table in `targets` already has those rows); None: the table is the vocabulary, no added tokens."""
    from wurst_jax.lora.peft_format import LoraError

    filters = DEFAULT_FILTERS if module_filters is None else tuple(module_filters)
    problems: list[str] = []
    pairs: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _WEIGHT.match(key)
        if m:
            pairs.setdefault(int(m[1]), {})[m[2]] = np.asarray(value, np.float32)
        elif key not in _EMBEDDINGS:
            problems.append(f"{key}: not an original Stable Cascade LoRA key (weights.<i>.lora_down / lora_up, "
                            f"embeddings.embeddings / embeddings.indices)")  # fmt: skip
    found, unsupported = sites(targets["prior"], filters)
    problems += [f"{n}: matches module_filters {list(filters)} but is no Linear layer" for n in unsupported]
    prior: Adapter = {}
    for i in sorted(pairs):
        ab = pairs[i]
        if i >= len(found):
            problems.append(
                f"weights.{i}: the prior has only {len(found)} modules matching module_filters {list(filters)}"
            )
            continue
        site = found[i]
        if set(ab) != {"lora_down", "lora_up"}:
            problems.append(f"weights.{i} ({site.name}): has {sorted(ab)} but needs lora_down and lora_up")
            continue
        down, up = ab["lora_down"], ab["lora_up"]
        n_in = _shape(targets["prior"], site.paths[0])[0]
        n_out = sum(_shape(targets["prior"], p)[1] for p in site.paths)
        r = down.shape[0] if down.ndim == 2 else -1
        if down.ndim != 2 or up.ndim != 2 or (down.shape, up.shape) != ((r, n_in), (n_out, r)):
            problems.append(f"weights.{i} ({site.name}): lora_down {down.shape} / lora_up {up.shape} do not fit "
                            f"its weight [out, in] ({n_out}, {n_in}): expected [r, {n_in}] / [{n_out}, r]")  # fmt: skip
            continue
        up = up * (1.0 / down.shape[0])  # alpha 1: the original's scale is 1 / rank
        rows = np.split(up, len(site.paths), axis=0)
        for path, part in zip(site.paths, rows, strict=True):
            prior["/".join(path)] = {"down": np.ascontiguousarray(down.T), "up": np.ascontiguousarray(part.T)}
    missing = [f"weights.{i}" for i in range(len(found)) if i not in pairs]
    if pairs and missing:  # the original loads its `lora` dict strictly: one entry per adapted module
        problems.append(f"missing {missing}: the prior has {len(found)} modules matching module_filters "
                        f"{list(filters)} (the filters of the training config)")  # fmt: skip
    adapters = {"prior": prior} if prior else {}
    text = _retoken(tensors, targets.get("text_encoder"), problems, added)
    if text:
        adapters["text_encoder"] = text
    for prefix, layers in adapters.items():
        problems += [f"{prefix} {k}: {why}" for k, why in check_against(targets[prefix], layers)]
    if problems:
        raise LoraError(f"{where}: {len(problems)} problem(s), nothing applied:\n  " + "\n  ".join(problems))
    if not adapters:
        raise LoraError(f"{where}: no LoRA weights in it")
    return adapters


def _shape(tree: Any, path: tuple[str, ...]) -> tuple[int, ...]:
    for p in path:
        tree = tree[p]
    return tuple(tree.shape)


def _retoken(tensors: dict[str, Any], text: Any, problems: list[str], added: Any = None) -> Adapter:
    """ReToken's rows as a rank-n adapter of the token embedding table (empty when the file has no rows)."""
    if not any(k in tensors for k in _EMBEDDINGS):
        return {}
    if not all(k in tensors for k in _EMBEDDINGS):
        problems.append(f"ReToken needs both {list(_EMBEDDINGS)}")
        return {}
    rows = np.asarray(tensors["embeddings.embeddings"], np.float32)
    ids = np.asarray(tensors["embeddings.indices"]).reshape(-1)
    if rows.ndim != 2 or rows.shape[0] != ids.shape[0]:
        problems.append(f"embeddings.embeddings {rows.shape} needs one row per embeddings.indices {ids.shape}")
        return {}
    vocab0, _, n_new = added or (0, 0, 0)
    if rows.shape[0] == 0 and n_new:
        problems.append(f"embeddings.indices: no added-token ids but {n_new} train token(s) add ids from {vocab0} on")
    if rows.shape[0] == 0:
        return {}  # the original always saves a ReToken, empty without train_tokens
    path = None if text is None else _token_embedding(text)
    if path is None:
        problems.append("embeddings.embeddings: this pipeline has no CLIP text encoder token embedding to add to")
        return {}
    table, dim = _shape(text, path)
    vocab, start, n_new = added or (table, table, 0)
    ids = ids.astype(np.int64)
    if rows.shape[1] != dim:
        problems.append(f"embeddings.embeddings {rows.shape}: the text encoder's token embedding is [{table}, {dim}]")
    new = sorted({int(i) for i in ids if i >= vocab})
    bad = sorted(int(i) for i in ids if i < 0)
    if new and not n_new:
        problems.append(f"embeddings.indices {new}: tokens the original training added to its tokenizer (ids "
                        f"from the vocabulary, {vocab}, on): pass its train_tokens=['[name]', ...]")  # fmt: skip
    elif new != list(range(vocab, vocab + n_new)):
        problems.append(f"embeddings.indices: added-token ids {new} but {n_new} train token(s) add ids "
                        f"{list(range(vocab, vocab + n_new))}")  # fmt: skip
    if bad:
        problems.append(f"embeddings.indices {bad}: negative token ids")
    if rows.shape[1] != dim or bad or new != list(range(vocab, vocab + n_new)):
        return {}
    ids = np.where(ids >= vocab, ids - vocab + start, ids)  # the file's added ids → this table's rows for them
    down = np.zeros((table, len(ids)), np.float32)
    down[ids, np.arange(len(ids))] = 1.0  # a repeated id adds each of its rows, as the original's loop does
    return {"/".join(path): {"down": down, "up": rows}}


def to_state_dict(
    weights: list[tuple[np.ndarray, np.ndarray]], token_dim: int, retoken: Any = None
) -> dict[str, np.ndarray]:
    """The original's `lora` state dict from (lora_down [r, in], lora_up [out, r]) per site in the original order,
    and ReToken's (rows [n, token_dim], token ids [n]) — empty without (the original always saves one)."""
    out: dict[str, np.ndarray] = {}
    for i, (down, up) in enumerate(weights):
        out[f"weights.{i}.lora_down"] = np.ascontiguousarray(np.asarray(down, np.float32))
        out[f"weights.{i}.lora_up"] = np.ascontiguousarray(np.asarray(up, np.float32))
    rows, ids = retoken if retoken is not None else (np.zeros((0, token_dim)), np.zeros((0,)))
    if np.shape(rows) != (len(ids), token_dim):
        raise ValueError(f"ReToken rows {np.shape(rows)} must be [{len(ids)} ids, {token_dim}]")
    out["embeddings.embeddings"] = np.ascontiguousarray(np.asarray(rows, np.float32))
    out["embeddings.indices"] = np.asarray(ids, np.int64).reshape(-1)
    return out


def write_file(path: Any, weights: list[tuple[np.ndarray, np.ndarray]], token_dim: int, retoken: Any = None) -> Any:
    """Write the original's `lora.safetensors` (`to_state_dict`): `path` is a folder or a `.safetensors` name."""
    from pathlib import Path

    from safetensors.numpy import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / FILE_NAME
    save_file(to_state_dict(weights, token_dim, retoken), str(p), metadata={"format": "pt"})
    return p
