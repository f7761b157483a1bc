"""`wurst-jax generate --control canny|inpaint --controlnet PATH --control-image FILE [--mask FILE]
[--control-scale S]`: the Stable Cascade stage C ControlNet flags, checked before anything is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CONTROLS = ("canny", "inpaint", "sr")


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        choices=CONTROLS,
        help="Stable Cascade ControlNet kind: canny (edges of --control-image), inpaint (with --mask); sr is not "
        "wired to the CLI yet",
    )
    p.add_argument("--controlnet", metavar="PATH", help="the ControlNet: a converted folder (wurst-jax convert)")
    p.add_argument("--control-image", metavar="FILE", help="the image the ControlNet's condition is made from")
    p.add_argument("--mask", metavar="FILE", help="inpaint mask image: white = generate, black = keep")
    p.add_argument("--control-scale", type=float, default=None, help="controlnet_conditioning_scale (default 1.0)")


def control_options(args: argparse.Namespace, cascade: bool) -> tuple[dict, dict]:
    """(from_pretrained kwargs, call kwargs) for the control flags; ValueError (exit 2) on a bad combination."""
    flags = {"--controlnet": args.controlnet, "--control-image": args.control_image, "--mask": args.mask}
    given = [f for f, v in {**flags, "--control-scale": args.control_scale}.items() if v is not None]
    if args.control is None:
        if given:
            raise ValueError(f"{given[0]} needs --control canny|inpaint")
        return {}, {}
    if not cascade:
        raise ValueError("--control needs a Stable Cascade --model (model_index.json StableCascade*)")
    if args.control == "sr":
        raise ValueError("--control sr is not available from the CLI yet (it needs the EfficientNet encoder)")
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
    scale = 1.0 if args.control_scale is None else args.control_scale
    if not scale >= 0 or scale == float("inf"):
        raise ValueError(f"--control-scale must be a finite number >= 0, got {args.control_scale}")
    call: dict[str, Any] = {"control_image": _image(args.control_image, "--control-image")}
    call["controlnet_conditioning_scale"] = scale
    if args.mask is not None:
        call["mask_image"] = _image(args.mask, "--mask").convert("L")
    return {"controlnet": args.controlnet, "control_type": args.control}, call


def _image(path: str, flag: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({e})") from None
