"""The adapter between batch generation / serving and a text-to-image model.

Batch jobs and the server see a model only through this file: `ModelSpec` reads a model's folders without loading
any weights (its default size and guidance, which sizes it can make, a digest for provenance, its tokenizer's
limit) and loads the pipeline; `generate_images` runs one batch through a pipeline that takes diffusers' combined
pipeline arguments (`prompt`, `negative_prompt`, `height`, `width`, `prior_num_inference_steps`,
`prior_guidance_scale`, `num_inference_steps`, `decoder_guidance_scale`, `num_images_per_prompt`, `seed`,
`output_type`). Both generations run through it: a decoder folder whose model_index.json names a
`StableCascade*` pipeline is Stable Cascade (`ModelSpec.generation`, read as `wurst-jax generate` reads it), anything
else Würstchen v2; the spec picks the pipeline class and the generation's default schedules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

TINY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny"
DEFAULT_STEPS = {"v2": 12, "cascade": 10}  # decoder steps (diffusers' combined v2 / Stable Cascade decoder defaults)
CASCADE_PRIOR_STEPS = 20  # diffusers' StableCascadePriorPipeline default
MAX_SIZE = 16384  # pixels per side; far beyond what any stage was trained for, a guard against typos


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the images of one compiled batch share: the size and the sampling settings.

    `prior_steps` None means the model's own prior schedule (v2: the 29 `DEFAULT_STAGE_C_TIMESTEPS`).
    """

    height: int
    width: int
    prior_steps: int | None
    prior_guidance: float
    steps: int
    decoder_guidance: float

    def label(self) -> str:
        prior = f"{self.prior_steps} prior steps" if self.prior_steps else "default prior steps"
        return (
            f"{self.height}×{self.width}, {prior} (guidance {self.prior_guidance:g}), "
            f"{self.steps} decoder steps (guidance {self.decoder_guidance:g})"
        )


@dataclasses.dataclass(frozen=True)
class Row:
    """One image: its prompt, negative prompt (None: none) and seed (its noise depends on nothing else)."""

    prompt: str
    negative_prompt: str | None
    seed: int


def generate_images(pipe: Any, settings: Settings, rows: list[Row], prior_defaults: dict | None = None) -> list:
    """One pipeline call making one image per row (PIL, in row order); each row's seed is that image's seed, so
    an image does not depend on the other rows of its batch. `prior_defaults`: the keyword arguments that select
    the model's own prior schedule when `settings.prior_steps` is None."""
    if settings.prior_steps:
        prior = {"prior_num_inference_steps": settings.prior_steps}
    else:
        prior = dict(prior_defaults or {})
    negatives = [r.negative_prompt or "" for r in rows]
    return pipe(
        prompt=[r.prompt for r in rows],
        negative_prompt=negatives if any(negatives) else None,
        seed=[r.seed for r in rows],
        height=settings.height,
        width=settings.width,
        prior_guidance_scale=settings.prior_guidance,
        num_inference_steps=settings.steps,
        decoder_guidance_scale=settings.decoder_guidance,
        num_images_per_prompt=1,
        output_type="pil",
        **prior,
    ).images


class StageLog(io.TextIOBase):
    """A stand-in for stderr while many batches run: the pipeline's per-call "… ran in N s" lines are dropped (a
    progress bar or /metrics says as much), every other line goes to `write`; the seconds of its "compiled in N s"
    lines (once per stage and shape) are summed in `compile_seconds`."""

    def __init__(self, write: Any):
        self._write, self._buf, self.compile_seconds = write, "", 0.0

    def write(self, s: str) -> int:
        *lines, self._buf = (self._buf + s).split("\n")
        for line in lines:
            if re.search(r"\bran in [0-9.]+ s", line):
                continue
            if m := re.search(r"compiled in ([0-9.]+) s", line):
                self.compile_seconds += float(m.group(1))
            self._write(line)
        return len(s)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _digest(folder: Path) -> str | None:
    """sha256 (16 hex digits) of the folder's wurst_jax_manifest.json (converted) or model_index.json (diffusers)."""
    for name in ("wurst_jax_manifest.json", "model_index.json"):
        if (folder / name).is_file():
            return hashlib.sha256((folder / name).read_bytes()).hexdigest()[:16]
    return None


def check_variant(folder: Path, variant: str) -> None:
    """Every weight-holding component folder of a pipeline folder has `variant` files (`<stem>.<variant>.safetensors`
    or `<stem>.safetensors.index.<variant>.json`); ValueError naming the first that has not, before any loading."""
    if not variant or not variant.replace("_", "").isalnum():
        raise ValueError(f"--variant must be a word such as 'bf16', got {variant!r}")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        weights = sorted(p.name for p in sub.glob("*.safetensors*"))
        if weights and not any(f".{variant}." in name for name in weights):
            raise ValueError(
                f"--variant {variant}: {sub} has no {variant} weight files (such as diffusion_pytorch_model."
                f"{variant}.safetensors or model.{variant}.safetensors); it has {', '.join(weights[:3])}"
            )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Würstchen v2 or Stable Cascade model as its folders describe it, before any weights load.

    `resolution_multiple`, `latent_dim_scale` and the decoder's `downscale` decide which sizes the model can
    make: the prior grid is ceil(size / resolution_multiple), the decoder grid int(grid · latent_dim_scale),
    which the decoder's U-Net must be able to halve (a positive multiple of `downscale`).
    """

    decoder: Path
    prior: Path | None
    default_size: int = 1024
    default_decoder_guidance: float = 0.0
    resolution_multiple: float = 42.67
    latent_dim_scale: float = 10.67
    downscale: int = 16
    generation: str = "v2"  # "cascade": the decoder folder's model_index.json names a StableCascade* pipeline
    variant: str | None = None  # diffusers' variant weight files to load ("bf16": `*.bf16.safetensors`)

    @classmethod
    def from_folders(cls, model: str | None = None, prior: str | None = None, variant: str | None = None) -> ModelSpec:
        """`model` a decoder folder or a combined one (with prior_prior/), `prior` a prior folder; no `model`:
        the tiny model shipped with wurst_jax. `variant` ("bf16") names the weight files `load` reads."""
        if model is None:
            if prior is not None:
                raise ValueError("--prior needs --model")
            model, prior = str(TINY_MODEL / "wuerstchen"), str(TINY_MODEL / "wuerstchen-prior")
        dec = Path(model).expanduser()
        pri = None if prior is None else Path(prior).expanduser()
        for p in (dec, pri):
            if p is not None and not p.is_dir():
                raise ValueError(f"{p}: no such folder")
        if pri is None and not (dec / "prior_prior").is_dir():
            raise ValueError(f"{dec}: has no prior_prior/ (not a combined folder); give the prior folder with --prior")
        if not (dec / "decoder" / "config.json").is_file():
            raise ValueError(f"{dec}: missing decoder/config.json; expected a decoder pipeline folder")
        if variant is not None:
            for folder in (dec, pri):
                if folder is not None:
                    check_variant(folder, variant)
        index, prior_index = _json(dec / "model_index.json"), _json((pri or dec) / "model_index.json")
        cfg = _json(dec / "decoder" / "config.json")
        try:
            if "block_out_channels" in cfg:  # Stable Cascade's stage B: its config's own rule
                from wurst_jax.models.cascade.config import StableCascadeUNetConfig

                keys = {f.name for f in dataclasses.fields(StableCascadeUNetConfig)}
                downscale = StableCascadeUNetConfig(**{k: v for k, v in cfg.items() if k in keys}).downscale
            else:
                downscale = int(cfg.get("patch_size", 2)) * 2 ** (len(cfg.get("c_hidden", (0,) * 4)) - 1)
            name = index.get("_class_name", "")
            return cls(
                generation="cascade" if isinstance(name, str) and name.startswith("StableCascade") else "v2",
                variant=variant,
                decoder=dec.resolve(),
                prior=None if pri is None else pri.resolve(),
                default_size=int(index.get("default_size", 1024)),
                default_decoder_guidance=float(index.get("default_decoder_guidance", 0.0)),
                resolution_multiple=float(prior_index.get("resolution_multiple", 42.67)),
                latent_dim_scale=float(index.get("latent_dim_scale", 10.67)),
                downscale=downscale,
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{dec}: model_index.json / decoder/config.json hold unexpected values ({e})") from None

    @property
    def prior_defaults(self) -> dict:
        """Keyword arguments for the model's own prior schedule (v2: the authors' 29 timesteps; Stable Cascade:
        20 evenly spaced steps, diffusers' prior default)."""
        if self.generation == "cascade":
            return {"prior_num_inference_steps": CASCADE_PRIOR_STEPS}
        from wurst_jax import DEFAULT_STAGE_C_TIMESTEPS

        return {"prior_timesteps": DEFAULT_STAGE_C_TIMESTEPS}

    @property
    def default_steps(self) -> int:
        """Decoder steps when a request sets none (v2 12, Stable Cascade 10)."""
        return DEFAULT_STEPS[self.generation]

    def _grid_ok(self, grid: int) -> bool:
        size = int(grid * self.latent_dim_scale)
        return size >= self.downscale and size % self.downscale == 0

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError naming the side and sizes that work when the model cannot make height × width."""
        for name, px in (("height", height), ("width", width)):
            if px > MAX_SIZE:
                raise ValueError(f"{name} {px} is larger than {MAX_SIZE}")
            grid = math.ceil(px / self.resolution_multiple)
            if not self._grid_ok(grid):
                ok = [math.floor(g * self.resolution_multiple) for g in range(1, 400) if self._grid_ok(g)][:6]
                raise ValueError(
                    f"{name} {px} is not a size this model can make (prior grid {grid} → decoder grid "
                    f"{int(grid * self.latent_dim_scale)}, not a multiple of {self.downscale}); sizes that work: "
                    f"{', '.join(map(str, ok))}, …"
                )

    def provenance(self) -> dict:
        """Model folders and the digests that identify their contents (recorded with every image)."""
        out = {"decoder": str(self.decoder), "decoder_digest": _digest(self.decoder)}
        if self.prior is not None:
            out.update(prior=str(self.prior), prior_digest=_digest(self.prior))
        return out

    def tokenizer(self) -> Any:
        """The prior's CLIP tokenizer (the decoder's is the same vocabulary): for the prompt length limit."""
        from transformers import AutoTokenizer

        folder = self.prior / "tokenizer" if self.prior is not None else self.decoder / "prior_tokenizer"
        return AutoTokenizer.from_pretrained(str(folder))

    def token_counter(self) -> tuple[Any, int]:
        """(count(text) -> the number of tokens the text encoder would see, the limit) for refusing long prompts
        (the pipeline would truncate them); weighting markup is not counted, as the pipeline strips it."""
        from wurst_jax.pipelines.prompts import strip_weights

        tok = self.tokenizer()
        return (lambda text: len(tok(strip_weights(text), verbose=False).input_ids)), int(tok.model_max_length)

    def load(self, dtype: Any = None, mesh: Any = None, sharding: str | None = None, **kwargs: Any) -> Any:
        """The generation's combined pipeline (`offload`, `progress` pass through to `from_pretrained`)."""
        import jax.numpy as jnp

        import wurst_jax as wj

        cls = wj.StableCascadeCombinedPipeline if self.generation == "cascade" else wj.WuerstchenPipeline
        return cls.from_pretrained(
            decoder=self.decoder,
            prior=self.prior,
            dtype=jnp.bfloat16 if dtype is None else dtype,
            mesh=mesh,
            sharding=sharding,
            variant=self.variant,
            **kwargs,
        )

    def generator(self, pipe: Any):
        """`generate(settings, rows) -> images` bound to a loaded pipeline."""
        defaults = self.prior_defaults
        return lambda settings, rows: generate_images(pipe, settings, rows, defaults)
