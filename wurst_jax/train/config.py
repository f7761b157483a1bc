"""`wurst-jax train` configs, read and checked once, before any model is built or any weights are read.

A config is one JSON object. Run settings (`RunConfig`'s fields) sit at top level and may be overridden per stage
in a section named after the stage ("a", "b", "c"; the tiny recipe also "a-decoder"). A config with `init` (at top
level or in a section) fine-tunes a checkpoint (`FinetuneConfig`); without, it trains the tiny model from scratch
(`TinyRun`: `out`, `size`, `model` plus the run settings). Stage "c-controlnet" (a Stable Cascade ControlNet) is a
fine-tune with a "controlnet" object (`controlnet_run`, `ControlNetRun`). Every key is checked: an unknown one, a
value of the wrong type or out of range, a section that is not an object, a file that is not JSON — each is one
`ValueError` naming the file and the key (`run.json: section 'c': key 'lr' must be a number > 0, got 'fast'`),
which the CLI prints as one line and exits 2 on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_STAGES = ("a", "a-decoder", "b", "c")
FINETUNE_STAGES = ("a", "b", "c", "c-controlnet")
FINETUNE_KEYS = (
    "init", "data", "dtype", "save_dtype", "sharding", "scan_blocks", "remat", "lora_rank", "lora_targets",
    "train_tokens", "controlnet",
)  # fmt: skip
CONTROL_FILTERS = {"canny": 1, "inpaint": 4, "sr": 16}  # the condition's channels (the ControlNet's c_in)
BLOCK_OPTIONS = ("scan_blocks", "remat")  # execution options of the prior and the decoder: stages c and b
DTYPES = ("float32", "bfloat16")
WEIGHTINGS = ("p2", "v")  # objectives.WEIGHTINGS (not imported: this file needs no jax)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One stage's training run."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    loss_weighting: str = "p2"  # Stage C: "p2" (the original's) or "v" (see objectives.v_weight)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    data_workers: int = 0  # processes rendering batches ahead (use several on a GPU; 0: render in-process)
    max_seconds: float | None = None  # stop (and save) after this long; running again continues


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """A tiny-model config: the run folder, image size, the "model" section (`recipe.tiny_config` builds the
    architecture from it), the seed of the initial weights and, with a stage, that stage's run settings."""

    out: str
    size: int = 64
    model: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    run: RunConfig | None = None


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
    lora_rank: int | None = None  # stage c: train a LoRA of this rank only (v2: a diffusers/PEFT file; Stable
    # Cascade: the original's lora.safetensors)
    lora_targets: str = "attention"  # "attention" (to_q/to_k/to_v/to_out.0) or "all-linear"
    train_tokens: tuple | None = None  # Stable Cascade LoRA: ReToken rows trained too, the original's syntax
    # [["[fernando]", "^dog</w>"], ...] ((token, aggregation regex or None) pairs; `lora/retoken_train.py`)
    controlnet: ControlNetRun | None = None  # stage c-controlnet: what the ControlNet is and sees


@dataclasses.dataclass(frozen=True)
class ControlNetRun:
    """The "controlnet" object of a `--stage c-controlnet` config (`wurst_jax/controlnet/train.py`)."""

    filter: str  # "canny", "inpaint" or "sr": the condition made from each sample's image
    model: Any = None  # the ControlNetConfig (default: the released file's preset for the filter)
    init: str | None = None  # a ControlNet folder to start from (default: a fresh one, zero output projections)
    effnet: str | None = None  # sr: Stable Cascade's EfficientNet encoder folder
    offset_noise: float | None = None  # default as the released configs: 0.1 for inpaint and sr, 0 for canny
    stage_c_dropout: bool = True  # the original keeps the frozen stage C in training mode (dropout active)
    p_outpaint: float = 0.4  # inpaint: the share of outpainting masks (the original InpaintFilter's)

    def __post_init__(self):
        if self.offset_noise is None:
            object.__setattr__(self, "offset_noise", 0.0 if self.filter == "canny" else 0.1)


# ---------------------------------------------------------------- value checks: a message, or None when fine


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def integer(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and v >= low else f"must be an integer >= {low}"


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A finite number (not a bool) >= `low` (> with `low_open`), and <= `high` (< with `high_open`)."""
    if high is None:
        want = f"a number {'>' if low_open else '>='} {low}"
    else:
        want = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(v):
        ok = _is_number(v) and (v > low if low_open else v >= low)
        ok = ok and (high is None or (v < high if high_open else v <= high))
        return None if ok else f"must be {want}"

    return check


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    text = " or ".join(repr(c) for c in choices)
    return lambda v: None if any(v == c and type(v) is type(c) for c in choices) else f"must be {text}"


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else check(v)


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string (a path)"


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def train_tokens_problem(v: Any) -> str | None:
    """The original's `train_tokens`: a non-empty list of [token, aggregation regex or null] pairs (or bare token
    strings), each regex valid."""
    want = 'must be a non-empty list of [token, aggregation regex or null] pairs (e.g. [["[name]", "^dog</w>"]])'
    if not isinstance(v, list) or not v:
        return want
    for entry in v:
        pair = [entry, None] if isinstance(entry, str) else entry
        if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            return want
        if pair[1] is not None and not isinstance(pair[1], str):
            return want
        for regex in (pair[1], None if _is_token(pair[0]) else pair[0]):
            try:
                re.compile(regex or "")
            except re.error as e:
                return f"has an invalid regex {regex!r} ({e})"
    return None


def train_token_flags(values: list[str], flag: str = "--train-tokens") -> list[list]:
    """`--train-tokens TOKEN[,REGEX]` values → [[token, regex or None], ...] (split at the first comma), checked as
    the config key is; a ValueError names the flag."""
    pairs = []
    for v in values:
        token, sep, regex = v.partition(",")
        if not token or (sep and not regex):
            raise ValueError(f"{flag}: expected TOKEN or TOKEN,REGEX (e.g. '[fernando],^dog</w>'), got {v!r}")
        pairs.append([token, regex if sep else None])
    problem = train_tokens_problem(pairs)
    if problem:
        raise ValueError(f"{flag} {problem}")
    return pairs


def _is_token(text: str) -> bool:
    """A `[name]` / `<name>` train token is added to the tokenizer; anything else is a regex over the vocabulary
    (the original's rule, `lora/tokens.is_new`)."""
    return (text.startswith("[") and text.endswith("]")) or (text.startswith("<") and text.endswith(">"))


RUN_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "steps": integer(1),
    "batch_size": integer(1),
    "lr": number(0, low_open=True),
    "warmup_steps": integer(0),
    "ema_decay": number(0, 1, high_open=True),
    "cond_dropout": number(0, 1),
    "loss_weighting": one_of(*WEIGHTINGS),
    "seed": integer(0),
    "log_every": integer(1),
    "ckpt_every": integer(1),
    "data_workers": integer(0),
    "max_seconds": optional(number(0)),
}
assert set(RUN_CHECKS) == {f.name for f in dataclasses.fields(RunConfig)}

FINETUNE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "init": _string,
    "data": _string,
    "dtype": one_of(*DTYPES),
    "save_dtype": one_of(*DTYPES),
    "sharding": optional(one_of("dp", "fsdp")),
    "scan_blocks": _boolean,
    "remat": _boolean,
    "lora_rank": optional(integer(1)),
    "lora_targets": one_of("attention", "all-linear"),
    "train_tokens": train_tokens_problem,
}
TINY_CHECKS: dict[str, Callable[[Any], str | None]] = {"size": integer(8)}


def _where(section: str | None, key: str) -> str:
    return f"key {key!r}" if section is None else f"section {section!r}: key {key!r}"


def _check_values(name: str, values: dict, checks: dict, section: str | None = None) -> None:
    for key, value in values.items():
        problem = checks[key](value) if key in checks else None
        if problem:
            raise ValueError(f"{name}: {_where(section, key)} {problem}, got {value!r}")


# ---------------------------------------------------------------- the file


def read_config(path: str | Path) -> dict:
    """The JSON object in `path`; a missing file, invalid JSON or anything but an object names the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the config ({e})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a JSON object ({{...}}), got {_short(raw)}")
    return raw


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_finetune(raw: dict) -> bool:
    """A config with "init" (top level or in a stage section) fine-tunes; without, it trains the tiny model."""
    if not isinstance(raw, dict):
        return False
    return "init" in raw or any(isinstance(v, dict) and "init" in v for v in raw.values())


def _sections(raw: dict, stages: tuple[str, ...], known: set[str], name: str, checks: dict) -> None:
    """Every stage section present: an object of known keys with valid values."""
    for s in stages:
        if s not in raw:
            continue
        section = raw[s]
        if not isinstance(section, dict):
            raise ValueError(f"{name}: section {s!r} must be an object of run settings, got {_short(section)}")
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"{name}: section {s!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        _check_values(name, section, checks, s)


def _out(raw: dict, name: str) -> str:
    if "out" not in raw:
        raise ValueError(f"{name}: needs an 'out' folder")
    _check_values(name, {"out": raw["out"]}, {"out": _string})
    return raw["out"]


def _run(merged: dict, keys: set[str]) -> RunConfig:
    return RunConfig(**{k: v for k, v in merged.items() if k in keys})


def tiny_run_config(raw: dict, stage: str | None, name: str = "config") -> TinyRun:
    """Check a tiny-model config (run settings at top level, overridden by the stage's section) and build it;
    `stage` None (export only) checks the whole config and gives no run settings."""
    if stage is not None and stage not in TINY_STAGES:
        raise ValueError(f"{name}: the tiny model trains stage {', '.join(TINY_STAGES)}, not {stage!r}")
    run_keys = set(RUN_CHECKS)
    known = run_keys | {"out", "size", "model"}
    unknown = set(raw) - known - set(TINY_STAGES)
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)}; known: {sorted(known | set(TINY_STAGES))}")
    checks = {**RUN_CHECKS, **TINY_CHECKS}
    _check_values(name, {k: v for k, v in raw.items() if k not in TINY_STAGES}, checks)
    if "model" in raw and not isinstance(raw["model"], dict):
        raise ValueError(f"{name}: key 'model' must be an object (the architecture), got {_short(raw['model'])}")
    _sections(raw, TINY_STAGES, run_keys, name, RUN_CHECKS)
    out = _out(raw, name)
    run = None
    if stage is not None:
        run = _run({**{k: v for k, v in raw.items() if k in run_keys}, **raw.get(stage, {})}, run_keys)
    return TinyRun(out, raw.get("size", 64), dict(raw.get("model", {})), raw.get("seed", 0), run)


def finetune_config(raw: dict, stage: str | None, name: str = "config") -> FinetuneConfig:
    """Check a fine-tune config (settings at top level, overridden by the stage's section) and build it."""
    if stage not in FINETUNE_STAGES:
        if stage is None:
            raise ValueError(f"{name}: a fine-tune (a config with 'init') needs --stage a, b, c or c-controlnet")
        raise ValueError(
            f"{name}: fine-tuning (a config with 'init') trains stage a, b or c (or a ControlNet: c-controlnet), "
            f"not {stage!r}"
        )
    run_keys = set(RUN_CHECKS) - {"data_workers"}  # no rendering: shards are read
    known = run_keys | set(FINETUNE_KEYS)
    unknown = set(raw) - known - {"out", *FINETUNE_STAGES}
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)} for a fine-tune; known: {sorted(known | {'out'})}")
    checks = {**RUN_CHECKS, **FINETUNE_CHECKS}
    _check_values(name, {k: v for k, v in raw.items() if k not in FINETUNE_STAGES and k != "controlnet"}, checks)
    _sections(raw, FINETUNE_STAGES, known, name, checks)
    merged = {**{k: v for k, v in raw.items() if k in known}, **raw.get(stage, {})}
    for key in ("init", "data"):
        if key not in merged:
            raise ValueError(f"{name}: fine-tuning stage {stage} needs {key!r}")
    for key in BLOCK_OPTIONS:
        if merged.get(key) and stage == "a":
            raise ValueError(f"{name}: {key!r} is an option of the prior and the decoder (stages c, b), not stage a")
    if (stage == "c-controlnet") != ("controlnet" in merged):
        if stage == "c-controlnet":
            raise ValueError(f"{name}: stage c-controlnet needs a 'controlnet' object (at least its 'filter')")
        raise ValueError(f"{name}: 'controlnet' configures stage c-controlnet, not stage {stage}")
    if stage == "c-controlnet":
        for key in ("lora_rank", "sharding", "train_tokens"):
            if merged.get(key):
                raise ValueError(f"{name}: stage c-controlnet runs on one device without a LoRA for now; drop {key!r}")
        merged["controlnet"] = controlnet_run(merged["controlnet"], name)
    if merged.get("lora_rank") and stage != "c":
        raise ValueError(f"{name}: 'lora_rank' trains a LoRA of the prior (stage c), not stage {stage}")
    if merged.get("train_tokens") and not merged.get("lora_rank"):
        raise ValueError(f"{name}: 'train_tokens' trains ReToken rows beside a Stable Cascade LoRA: set 'lora_rank'")
    out = _out(raw, name)
    out_dir, init = Path(out).resolve(), Path(merged["init"]).resolve()
    if out_dir == init or init in out_dir.parents:
        raise ValueError(f"{name}: 'out' ({out}) must be a folder outside 'init' ({merged['init']})")
    extra = {k: merged[k] for k in FINETUNE_KEYS if k in merged and k not in ("init", "data")}
    if extra.get("train_tokens") is not None:  # frozen config: tuples, bare strings as (token, None)
        extra["train_tokens"] = tuple((t, None) if isinstance(t, str) else tuple(t) for t in extra["train_tokens"])
    return FinetuneConfig(stage, merged["init"], merged["data"], out, _run(merged, run_keys), **extra)


CONTROLNET_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "filter": one_of(*CONTROL_FILTERS),
    "init": _string,
    "effnet": _string,
    "offset_noise": number(0),
    "stage_c_dropout": _boolean,
    "p_outpaint": number(0, 1),
}


def controlnet_run(raw: Any, name: str) -> ControlNetRun:
    """The "controlnet" object: `filter` (required), `model` (ControlNetConfig fields over the filter's released
    preset; its `c_in` must be the filter's channels), `init`, `effnet` (sr only, required there), `offset_noise`,
    `stage_c_dropout`, `p_outpaint` (inpaint only)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: key 'controlnet' must be an object (with 'filter'), got {_short(raw)}")
    known = {*CONTROLNET_CHECKS, "model"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{name}: section 'controlnet': unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if "filter" not in raw:
        raise ValueError(f"{name}: section 'controlnet' needs 'filter': one of {sorted(CONTROL_FILTERS)}")
    _check_values(name, {k: v for k, v in raw.items() if k != "model"}, CONTROLNET_CHECKS, "controlnet")
    kind = raw["filter"]
    if (kind == "sr") != ("effnet" in raw):
        if kind == "sr":
            raise ValueError(f"{name}: section 'controlnet': filter 'sr' needs 'effnet' (the EfficientNet encoder)")
        raise ValueError(f"{name}: section 'controlnet': 'effnet' is for filter 'sr', not {kind!r}")
    if "p_outpaint" in raw and kind != "inpaint":
        raise ValueError(f"{name}: section 'controlnet': 'p_outpaint' is for filter 'inpaint', not {kind!r}")
    if "init" in raw and "model" in raw:
        raise ValueError(f"{name}: section 'controlnet': give 'model' or 'init' (its config.json), not both")
    from wurst_jax.models.cascade.controlnet import ControlNetConfig  # flax: only for this stage

    preset = {"canny": ControlNetConfig.canny, "inpaint": ControlNetConfig.inpainting, "sr": ControlNetConfig.sr}
    model = replace_checked(preset[kind](), raw.get("model", {}), name, "controlnet.model")
    if model.c_in != CONTROL_FILTERS[kind]:
        raise ValueError(
            f"{name}: key 'controlnet.model.c_in' must be {CONTROL_FILTERS[kind]} for filter {kind!r}, got {model.c_in}"
        )
    return ControlNetRun(**{k: v for k, v in raw.items() if k != "model"}, model=model)


# ---------------------------------------------------------------- dataclass overrides ("model" sections)

_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
}


_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null"}
_LISTS = {"int": "integers", "float": "numbers", "bool": "true / false", "str": "strings"}


def _describe(annotation: str) -> str:
    """`float | tuple[float, ...]` → "a number or a list of numbers"."""
    words = []
    for alt in (a.strip() for a in re.split(r"\|(?![^\[]*\])", annotation)):
        m = re.fullmatch(r"tuple\[(\w+), \.\.\.\]", alt)
        if m:
            words.append(f"a list of {_LISTS[m.group(1)]}" if m.group(1) in _LISTS else alt)
        else:
            words.append(_WORDS.get(alt, alt))
    return " or ".join(words)


def _fits(value: Any, annotation: str) -> bool | None:
    """Whether `value` (JSON: lists for tuples) fits a field annotation such as `int`, `tuple[int, ...]` or
    `float | tuple[float, ...]`; None when the annotation is not one of those (then anything is let through)."""
    verdicts = []
    for alt in (a.strip() for a in re.split(r"\|(?![^\[]*\])", annotation)):
        if alt in _TYPES:
            verdicts.append(_TYPES[alt](value))
        elif m := re.fullmatch(r"tuple\[(\w+), \.\.\.\]", alt):
            inner = _TYPES.get(m.group(1))
            if inner is None:
                return None
            verdicts.append(isinstance(value, (list, tuple)) and all(inner(x) for x in value))
        else:
            return None
    return any(verdicts)


def replace_checked(default: Any, values: Any, name: str, key: str) -> Any:
    """`dataclasses.replace(default, **values)` for a config section `key` of file `name`: an object of the
    dataclass's field names whose values fit the fields' types (lists become tuples); anything else raises one
    ValueError naming the file and the key."""
    if not isinstance(values, dict):
        raise ValueError(f"{name}: key {key!r} must be an object, got {_short(values)}")
    fields = {f.name: f for f in dataclasses.fields(default)}
    extra = set(values) - set(fields)
    if extra:
        raise ValueError(f"{name}: config section {key!r}: unknown keys {sorted(extra)}; known {sorted(fields)}")
    for k, v in values.items():
        annotation = fields[k].type if isinstance(fields[k].type, str) else getattr(fields[k].type, "__name__", "")
        if _fits(v, annotation) is False:
            raise ValueError(f"{name}: key '{key}.{k}' must be {_describe(annotation)}, got {_short(v)}")
    from wurst_jax.models import bounds  # here: this module stays importable without jax

    bounds.check_values(type(default), values, name, f"{key}.")  # `depth` 10**6 would build for hours
    try:
        config = dataclasses.replace(default, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:  # the dataclass's own checks (__post_init__)
        raise ValueError(f"{name}: config section {key!r}: {e}") from None
    bounds.check_blocks(config, f"{name}: config section {key!r}")
    return config
