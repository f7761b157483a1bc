"""`wurst-jax generate`'s argument checks: every flag checked before any weights load or anything compiles.

Each error is one line naming the flag (`--height 0: ...`) and what was expected; the CLI prints it and exits 2.
Sizes are checked against what the model can make (its own `resolution_multiple` / `latent_dim_scale`, read from
its folders without loading weights) and what memory can hold (`MAX_IMAGE_PIXELS` per image); `--num-images` is
split into batches of at most `--batch-size` images (default: as many as fit `BATCH_PIXELS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from wurst_jax.serving.backend import MAX_SIZE, TINY_MODEL, ModelSpec

MAX_IMAGE_PIXELS = 4096 * 4096  # one image's pixels: 16× v2's 1024², beyond that the decoder's activations alone
# outgrow an 80 GB accelerator
BATCH_PIXELS = 4 * 1024 * 1024  # pixels per compiled batch by default: four 1024² images (about 20 GB in bf16)
MAX_STEPS = 10_000  # sampling steps per stage; far beyond any useful schedule, a guard against typos
MAX_IMAGES = 1_000_000

DECODER_PARTS = ("decoder", "vqgan", "text_encoder", "tokenizer")
PRIOR_PARTS = ("prior", "text_encoder", "tokenizer")


@dataclasses.dataclass(frozen=True)
class GeneratePlan:
    """What `generate` runs once the arguments are checked: the model folders, the size, the batches."""

    model: str
    prior: str | None
    spec: ModelSpec
    height: int
    width: int
    out: Path
    batches: tuple[int, ...]  # images per pipeline call, summing to --num-images


def _int(flag: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{flag} {value}: expected an integer from {low} to {high}")
    return value


def _guidance(flag: str, value: object) -> None:
    if value is not None and (not math.isfinite(value) or not 0 <= value <= 1000):
        raise ValueError(f"{flag} {value}: expected a finite number from 0 to 1000")


def _missing(folder: Path, parts: tuple[str, ...], prefix: str = "") -> list[str]:
    """Component folders of `parts` that are absent, or present without their config.json (tokenizers have none)."""
    out = []
    for p in parts:
        sub = folder / (prefix + p)
        if not sub.is_dir() or (p != "tokenizer" and not (sub / "config.json").is_file()):
            out.append(f"{prefix}{p}/")
    return out


def check_model(model: str | None, prior: str | None) -> tuple[str, str | None]:
    """The decoder (or combined) folder and the prior folder; errors name the flag and every missing part. Only
    local folders: a mistyped path is never tried as a Hub download."""
    if model is None:
        if prior is not None:
            raise ValueError("--prior needs --model (the decoder folder)")
        return str(TINY_MODEL / "wuerstchen"), str(TINY_MODEL / "wuerstchen-prior")
    for flag, path in (("--model", model), ("--prior", prior)):
        if path is None:
            continue
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"{flag} {path}: no such folder (only local folders are read; nothing is downloaded)")
        if not p.is_dir():
            raise ValueError(f"{flag} {path}: not a folder")
    dec = Path(model).expanduser()
    missing = _missing(dec, DECODER_PARTS)
    if missing:
        raise ValueError(
            f"--model {model}: not a Würstchen decoder folder: missing {', '.join(missing)} (a decoder folder holds "
            f"{', '.join(p + '/' for p in DECODER_PARTS)} each with its config; a combined one also prior_prior/, "
            "prior_text_encoder/, prior_tokenizer/)"
        )
    if prior is None:
        if not (dec / "prior_prior").is_dir():
            raise ValueError(
                f"--model {model}: has no prior_prior/ (not a combined folder): give the prior folder with --prior"
            )
        missing = _missing(dec, PRIOR_PARTS, "prior_")
        if missing:
            raise ValueError(f"--model {model}: a combined folder, but missing {', '.join(missing)}")
    else:
        missing = _missing(Path(prior).expanduser(), PRIOR_PARTS)
        if missing:
            raise ValueError(
                f"--prior {prior}: not a Würstchen prior folder: missing {', '.join(missing)} (a prior folder holds "
                f"{', '.join(p + '/' for p in PRIOR_PARTS)})"
            )
    return model, prior


def check_size(spec: ModelSpec, flag: str, px: int) -> None:
    """`px` pixels along one side: a size the model can make (its own factor, not v2's 42.67)."""
    if px > MAX_SIZE:
        raise ValueError(f"{flag} {px}: larger than {MAX_SIZE} pixels")
    grid = math.ceil(px / spec.resolution_multiple)
    if not spec._grid_ok(grid):
        ok = [math.floor(g * spec.resolution_multiple) for g in range(1, 400) if spec._grid_ok(g)][:6]
        raise ValueError(
            f"{flag} {px}: not a size this model can make (pixels / {spec.resolution_multiple:g} → prior grid {grid}"
            f" → decoder grid {int(grid * spec.latent_dim_scale)}, not a multiple of {spec.downscale}); sizes that "
            f"work: {', '.join(map(str, ok))}, …"
        )


def check_out(out: str) -> Path:
    """A .png path whose folder exists (or whose folder's parent exists: one level is created, never a tree)."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: expected a .png file name")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder")
    if not parent.exists() and not parent.parent.is_dir():
        raise ValueError(f"--out {out}: folder {parent.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder")
    return path


def batches(n: int, height: int, width: int, batch_size: int | None) -> tuple[int, ...]:
    """`n` images as batches of at most `batch_size` (default: as many as fit `BATCH_PIXELS`, at least 1)."""
    size = batch_size or max(1, BATCH_PIXELS // (height * width))
    return tuple(min(size, n - i) for i in range(0, n, size))


def check_generate(args: argparse.Namespace) -> GeneratePlan:
    """Every flag of a single-prompt `generate`, checked in the order a user reads them; raises ValueError."""
    if args.prompt is None:
        raise ValueError("give a PROMPT, or --prompts FILE --out-dir DIR")
    if not args.prompt.strip():
        raise ValueError("PROMPT is empty")
    out = check_out(args.out)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None:
            _int(flag, value, 1, MAX_SIZE)
    n = _int("--num-images", args.num_images, 1, MAX_IMAGES)
    for flag, value in (("--steps", args.steps), ("--prior-steps", args.prior_steps)):
        if value is not None:  # None: the model family's default
            _int(flag, value, 1, MAX_STEPS)
    _guidance("--prior-guidance", args.prior_guidance)
    _guidance("--decoder-guidance", args.decoder_guidance)
    _int("--model-axis", args.model_axis, 1, 1 << 16)
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None:
        _int("--batch-size", batch_size, 1, MAX_IMAGES)
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir {args.cache_dir}: not a folder")
    model, prior = check_model(args.model, args.prior)
    spec = ModelSpec.from_folders(model, prior, getattr(args, "variant", None))
    height, width = args.height or spec.default_size, args.width or spec.default_size
    check_size(spec, "--height", height)
    check_size(spec, "--width", width)
    if height * width > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"--height {height} --width {width}: {height * width:,} pixels per image, more than memory holds "
            f"({MAX_IMAGE_PIXELS:,}, e.g. 4096×4096)"
        )
    return GeneratePlan(model, prior, spec, height, width, out, batches(n, height, width, batch_size))


def tiny_warnings(plan: GeneratePlan, prompt: str) -> list[str]:
    """Warning lines (printed to stderr, and returned) when the shipped tiny model is asked for what it never
    learnt: words outside its captions' vocabulary, no background colour, a size other than its trained one."""
    if Path(plan.model).resolve() != (TINY_MODEL / "wuerstchen").resolve():
        return []
    import re
    import sys

    from wurst_jax.pipelines.prompts import strip_weights
    from wurst_jax.tiny.data import caption_words

    words = re.findall(r"[a-z]+", strip_weights(prompt).lower())
    unknown = sorted({w for w in words if w not in caption_words()})
    lines = []
    if unknown:
        lines.append(
            f"the tiny model knows only its captions' words (colours, circle/square/triangle, positions, 'on a … "
            f"background'); unknown: {', '.join(unknown)}"
        )
    if "background" not in words:
        lines.append("the tiny model expects a background colour, e.g. 'a red circle on a blue background'")
    size = plan.spec.default_size
    if (plan.height, plan.width) != (size, size):
        lines.append(f"the tiny model was trained at {size}×{size}; {plan.height}×{plan.width} gives broken images")
    for line in lines:
        print(f"wurst-jax generate: warning: {line}", file=sys.stderr)
    return lines


DEFAULT_STRENGTH = 0.8  # --strength's default: the original Stable Cascade image-to-image example's noise_level
EFFNET_FILES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def read_image(flag: str, path: str):
    """An image file as a PIL image, read now (a missing or unreadable file fails before any weights load)."""
    from PIL import Image

    if not Path(path).expanduser().is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        with Image.open(Path(path).expanduser()) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({' '.join(str(e).split())})") from None


def check_image_inputs(args: argparse.Namespace, cascade: bool) -> tuple[list, object, float]:
    """--image, --init-image, --strength and --effnet: (variation images, the start image or None, strength).
    `cascade`: a Stable Cascade model (--image = CLIP image tokens; v2: the decoder from one image's latents)."""
    images, init, strength = args.image or [], args.init_image, args.strength
    if strength is not None:
        if init is None:
            raise ValueError("--strength needs --init-image FILE (the image to start from)")
        if not math.isfinite(strength) or not 0 < strength <= 1:
            raise ValueError(f"--strength {strength}: expected a number in (0, 1] (1 ignores the image)")
    if images and not cascade:
        if len(images) > 1:
            raise ValueError(f"--image given {len(images)} times: Würstchen v2 image variation takes one image")
        if init is not None:
            raise ValueError("--init-image with a Würstchen v2 --image: variation runs no prior to start from it")
    uses = (("--init-image", init is not None), ("--image", images and not cascade))
    needs = [f for f, used in (*uses, ("--control sr", getattr(args, "control", None) == "sr")) if used]
    if needs and args.effnet is None:
        raise ValueError(
            f"{needs[0]} needs --effnet PATH (the EfficientNet encoder: a folder converted with `wurst-jax convert "
            "... --stage effnet`, or effnet_encoder.safetensors / model_v2_stage_b.pt)"
        )
    if args.effnet is not None:
        if not needs:
            raise ValueError(
                "--effnet is used only with --init-image, --control sr, or --image with a Würstchen v2 model"
            )
        p = Path(args.effnet).expanduser()
        if not p.exists():
            raise ValueError(f"--effnet {args.effnet}: no such file or folder")
        if p.is_dir() and not (p / "config.json").is_file():
            raise ValueError(f"--effnet {args.effnet}: a folder without config.json (not an EfficientNet component)")
        if p.is_file() and p.suffix not in EFFNET_FILES:
            raise ValueError(f"--effnet {args.effnet}: expected a folder or a {'/'.join(EFFNET_FILES)} file")
    pictures = [read_image("--image", f) for f in images]
    start = None if init is None else read_image("--init-image", init)
    return pictures, start, DEFAULT_STRENGTH if strength is None else float(strength)
