"""`wurst-jax generate --control canny|inpaint|sr --controlnet PATH --control-image FILE [--mask FILE]
[--effnet PATH] [--control-scale S] [--shift S]`: the Stable Cascade stage C ControlNet flags and the stage C
schedule shift, checked before anything is loaded.

`--control sr` needs Stable Cascade's EfficientNet encoder, given explicitly with `--effnet PATH` (the original
`effnet_encoder.safetensors` converted with `wurst-jax convert --stage effnet`, or any folder `load_component`
reads as an effnet): no released diffusers folder holds it, so it is not looked for."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CONTROLS = ("canny", "inpaint", "sr")


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        choices=CONTROLS,
        help="Stable Cascade ControlNet kind: canny (edges of --control-image), inpaint (with --mask), sr "
        "(super-resolution of --control-image, with --effnet)",
    )
    p.add_argument("--controlnet", metavar="PATH", help="the ControlNet: a converted folder (wurst-jax convert)")
    p.add_argument("--control-image", metavar="FILE", help="the image the ControlNet's condition is made from")
    p.add_argument("--mask", metavar="FILE", help="inpaint mask image: white = generate, black = keep")
    p.add_argument(
        "--keep-unmasked",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--control inpaint: paste the control image's unmasked region back into the output, kept exactly "
        "(the default); --no-keep-unmasked gives the raw output, as the original Stable Cascade code does",
    )
    p.add_argument("--control-scale", type=float, default=None, help="controlnet_conditioning_scale (default 1.0)")
    p.add_argument(
        "--shift",
        type=float,
        default=None,
        help="Stable Cascade stage C schedule shift (the original notebooks sample with 2; default 1: diffusers')",
    )


def control_options(args: argparse.Namespace, cascade: bool) -> tuple[dict, dict]:
    """(from_pretrained kwargs, call kwargs) for the control flags; ValueError (exit 2) on a bad combination."""
    shift = {}
    if args.shift is not None:
        if not cascade:
            raise ValueError("--shift is a Stable Cascade stage C option: it needs a StableCascade --model")
        if not 0 < args.shift < float("inf"):
            raise ValueError(f"--shift must be a finite number > 0, got {args.shift}")
        shift = {"prior_shift": args.shift}
    flags = {"--controlnet": args.controlnet, "--control-image": args.control_image, "--mask": args.mask}
    flags["--control-scale"] = args.control_scale
    flags["--keep-unmasked"] = args.keep_unmasked  # --effnet is shared with image-to-image: validate.py checks it
    given = [f for f, v in flags.items() if v is not None]
    if args.control is None:
        if given:
            raise ValueError(f"{given[0]} needs --control canny|inpaint|sr")
        return {}, shift
    if not cascade:
        raise ValueError("--control needs a Stable Cascade --model (model_index.json StableCascade*)")
    if args.control == "sr" and args.effnet is None:
        raise ValueError("--control sr needs --effnet PATH (Stable Cascade's EfficientNet encoder, converted)")
    if args.prompts or args.out_dir:
        raise ValueError("--control runs with one PROMPT, not batch generation (--prompts)")
    if args.controlnet is None or args.control_image is None:
        raise ValueError(f"--control {args.control} needs --controlnet PATH and --control-image FILE")
    if not Path(args.controlnet).exists():
        raise ValueError(f"--controlnet {args.controlnet}: no such file or folder")
    if args.control == "inpaint" and args.mask is None:
        raise ValueError("--control inpaint needs --mask FILE (white = generate)")
    if args.control != "inpaint" and args.mask is not None:
        raise ValueError(f"--mask is for --control inpaint, not --control {args.control}")
    if args.control != "inpaint" and args.keep_unmasked is not None:
        raise ValueError(f"--keep-unmasked is for --control inpaint, not --control {args.control}")
    scale = 1.0 if args.control_scale is None else args.control_scale
    if not scale >= 0 or scale == float("inf"):
        raise ValueError(f"--control-scale must be a finite number >= 0, got {args.control_scale}")
    call: dict[str, Any] = {**shift, "control_image": _image(args.control_image, "--control-image")}
    call["controlnet_conditioning_scale"] = scale
    if args.mask is not None:
        call["mask_image"] = _image(args.mask, "--mask").convert("L")
    load = {"controlnet": args.controlnet, "control_type": args.control}
    return {**load, "effnet": args.effnet} if args.control == "sr" else load, call


def keep_unmasked(images: list, call: dict) -> list:
    """`--control inpaint`: the control image's unmasked region pasted back into each generated PIL image
    (`filters.composite`), the image and mask resized to the output first where their size differs (bicubic /
    nearest); the mask read as the pipeline reads it (grey / 255, masked above 0.5)."""
    import numpy as np
    from PIL import Image

    from wurst_jax.controlnet.filters import composite

    size = images[0].size
    original, mask = call["control_image"].convert("RGB"), call["mask_image"]
    original = original if original.size == size else original.resize(size, Image.BICUBIC)
    mask = np.asarray(mask if mask.size == size else mask.resize(size, Image.NEAREST), np.float32) / 255
    out = composite(np.asarray(original), np.stack([np.asarray(i.convert("RGB")) for i in images]), mask)
    return [Image.fromarray(np.rint(x * 255).astype(np.uint8)) for x in out]


def _image(path: str, flag: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({e})") from None
