"""`wurst-jax generate`: text-to-image PNGs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wurst_jax.dtypes import DTYPES
from wurst_jax.pipelines.runtime import use_compilation_cache
from wurst_jax.samplers import DEFAULT_STAGE_C_TIMESTEPS
from wurst_jax.serving.batch import add_batch_arguments, run_batch


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a text prompt", description=__doc__)
    p.add_argument(
        "prompt", nargs="?", help="what to draw; Compel weighting such as '(red)1.3' or 'circle++' is understood"
    )
    p.add_argument(
        "--model",
        help="decoder folder (warp-ai/wuerstchen layout) or a combined folder; default: the tiny model shipped "
        "with wurst_jax (64×64 shapes and colours)",
    )
    p.add_argument("--prior", help="prior folder (warp-ai/wuerstchen-prior layout); omit for a combined folder")
    p.add_argument("--out", default="image.png", help="output PNG; several images are numbered (image_0.png, …)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (used when guidance > 1)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's size, 1024 for v2)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's size, 1024 for v2)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument(
        "--prior-steps",
        type=int,
        default=None,
        help="prior steps, evenly spaced (default: the 29 DEFAULT_STAGE_C_TIMESTEPS the authors recommend)",
    )
    p.add_argument("--prior-guidance", type=float, default=4.0, help="prior classifier-free guidance (default 4.0)")
    p.add_argument("--steps", type=int, default=12, help="decoder steps (default 12)")
    p.add_argument(
        "--decoder-guidance",
        type=float,
        default=None,
        help="decoder guidance (default: the model's `default_decoder_guidance`, else 0: off, as diffusers)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same images")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="bfloat16", help="compute and weight dtype (default bfloat16)"
    )
    p.add_argument(
        "--offload",
        nargs="?",
        const="model",
        default=False,
        choices=("model", "sequential"),
        help="keep inactive stages in host memory (model, the default of a bare --offload); sequential: prior and "
        "decoder weights stay there too and one block repeat at a time moves to the device",
    )
    p.add_argument(
        "--cache-dir",
        help="persistent compilation cache folder (default: $WURST_JAX_CACHE_DIR, else "
        "$XDG_CACHE_HOME or ~/.cache, /wurst_jax/jax): later runs skip compiling",
    )
    p.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--sharding", choices=("dp", "fsdp", "tp"), help="shard over all devices (mesh data × model)")
    p.add_argument("--model-axis", type=int, default=1, help="size of the mesh's model axis (tp; default 1)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() first (TPU pods, SLURM)",
    )
    p.add_argument(
        "--coordinator", help="multi-host without auto-detection: coordinator host:port (implies --distributed)"
    )
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index (with --coordinator)")
    add_batch_arguments(p)


TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny"


def model_defaults(model: Path) -> tuple[int, float]:
    """(size, decoder guidance) a model was trained for: `default_size` and `default_decoder_guidance` in its
    model_index.json (the tiny model sets both), else v2's 1024 and diffusers' 0."""
    try:
        index = json.loads((model / "model_index.json").read_text())
        return int(index.get("default_size", 1024)), float(index.get("default_decoder_guidance", 0.0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 1024, 0.0


def generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import wurst_jax as wj

    if args.prompts or args.out_dir:  # many prompts from a file: wurst_jax/serving/batch.py
        return run_batch(args)
    if args.prompt is None:
        raise ValueError("give a PROMPT, or --prompts FILE --out-dir DIR")
    if args.distributed or args.coordinator:
        wj.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    use_compilation_cache(args.cache_dir, enabled=not args.no_cache)
    mesh = wj.make_mesh(data=-1, model=args.model_axis) if args.sharding or args.model_axis > 1 else None
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise SystemExit(f"--out must name a .png file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        if args.prior is not None:
            raise ValueError("--prior needs --model")
        args.model, args.prior = str(TINY_MODEL / "wuerstchen"), str(TINY_MODEL / "wuerstchen-prior")
    size, decoder_guidance = model_defaults(Path(args.model))
    pipe = wj.WuerstchenPipeline.from_pretrained(
        decoder=args.model,
        prior=args.prior,
        dtype=getattr(jnp, args.dtype),
        offload=args.offload,
        progress=not args.quiet,
        mesh=mesh,
        sharding=args.sharding,
    )
    images = pipe(
        args.prompt,
        height=args.height or size,
        width=args.width or size,
        prior_num_inference_steps=args.prior_steps or 60,
        prior_timesteps=None if args.prior_steps else DEFAULT_STAGE_C_TIMESTEPS,
        prior_guidance_scale=args.prior_guidance,
        num_inference_steps=args.steps,
        decoder_guidance_scale=decoder_guidance if args.decoder_guidance is None else args.decoder_guidance,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
    ).images
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    if jax.process_index() != 0:  # every process holds all images; one writes them
        return 0
    for image, path in zip(images, paths, strict=True):
        image.save(path)
        print(path)
    return 0
