"""`wurst-jax generate`: text-to-image, image-to-image (--init-image) and image variation (--image) PNGs.

The generation comes from the --model folder's model_index.json: `StableCascade*` pipelines run Stable Cascade
(Würstchen v3), anything else Würstchen v2. Defaults: v2 prior 29 DEFAULT_STAGE_C_TIMESTEPS, guidance 4, decoder
12 steps; Stable Cascade prior 20 steps, guidance 4, decoder 10 steps; decoder guidance 0 (off) for both.
Image-to-image and v2 variation encode the image with the EfficientNet encoder given by --effnet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wurst_jax.cli.control import add_control_arguments, control_options, keep_unmasked
from wurst_jax.cli.lora_flags import add_lora_arguments, load_loras, lora_options
from wurst_jax.cli.validate import DEFAULT_STRENGTH, check_generate, check_image_inputs, tiny_warnings
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
        help="decoder folder (warp-ai/wuerstchen or stabilityai/stable-cascade layout) or a combined folder; its "
        "model_index.json picks the generation; default: the tiny v2 model shipped with wurst_jax (64×64 shapes)",
    )
    p.add_argument(
        "--prior",
        help="prior folder (warp-ai/wuerstchen-prior or stabilityai/stable-cascade-prior layout); omit for a "
        "combined folder",
    )
    p.add_argument(
        "--image",
        action="append",
        metavar="FILE",
        help="image variation. Stable Cascade: condition the prior on this image (repeatable: one image token each; "
        "the prior folder needs image_encoder/). Würstchen v2: decode this image's EfficientNet latents (no prior "
        "runs; once; needs --effnet)",
    )
    p.add_argument(
        "--init-image",
        metavar="FILE",
        help="image-to-image: start the prior from this image's EfficientNet latents noised to --strength (needs "
        "--effnet; both generations)",
    )
    p.add_argument(
        "--strength",
        type=float,
        help=f"with --init-image: how far to noise it, in (0, 1]; int(prior steps · strength) steps run; 1 ignores "
        f"the image (default {DEFAULT_STRENGTH}, the original Stable Cascade example's)",
    )
    p.add_argument(
        "--effnet",
        metavar="PATH",
        help="the EfficientNet encoder for --init-image, v2 --image and --control sr: a folder (converted with "
        "`wurst-jax convert ... --stage effnet`) or the original file (Stable Cascade's effnet_encoder.safetensors, "
        "v2's model_v2_stage_b.pt)",
    )
    p.add_argument(
        "--variant", help="read the folders' diffusers variant weight files, e.g. bf16 (diffusion_pytorch_model.bf16…)"
    )
    p.add_argument("--out", default="image.png", help="output PNG; several images are numbered (image_0.png, …)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (used when guidance > 1)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's size, 1024 for v2)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's size, 1024 for v2)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument(
        "--prior-steps",
        type=int,
        default=None,
        help="prior steps, evenly spaced (default: v2 the 29 DEFAULT_STAGE_C_TIMESTEPS the authors recommend; "
        "Stable Cascade 20)",
    )
    p.add_argument("--prior-guidance", type=float, default=4.0, help="prior classifier-free guidance (default 4.0)")
    p.add_argument("--steps", type=int, default=None, help="decoder steps (default: v2 12, Stable Cascade 10)")
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
    add_control_arguments(p)
    add_lora_arguments(p)


def model_defaults(model: Path) -> tuple[int, float]:
    """(size, decoder guidance) a model was trained for: `default_size` and `default_decoder_guidance` in its
    model_index.json (the tiny model sets both), else v2's 1024 and diffusers' 0."""
    try:
        index = json.loads((model / "model_index.json").read_text())
        return int(index.get("default_size", 1024)), float(index.get("default_decoder_guidance", 0.0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 1024, 0.0


def is_stable_cascade(model: Path) -> bool:
    """Whether a pipeline folder's model_index.json names a Stable Cascade pipeline (`StableCascade*`)."""
    try:
        name = json.loads((model / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(name, str) and name.startswith("StableCascade")


def generate(args: argparse.Namespace) -> int:
    cascade = args.model is not None and is_stable_cascade(Path(args.model))
    control_load, control_call = control_options(args, cascade)  # checked before anything is loaded
    loras = lora_options(args, cascade)
    if args.prompts or args.out_dir:  # many prompts from a file, either generation: wurst_jax/serving/batch.py
        used = [f for f, v in (("--image", args.image), ("--init-image", args.init_image), ("--lora", loras)) if v]
        used += [f for f, v in (("--strength", args.strength), ("--effnet", args.effnet)) if v is not None]
        if used:
            raise ValueError(f"batch generation (--prompts) is text-to-image only; drop {' '.join(used)}")
        return run_batch(args)
    plan = check_generate(args)  # every flag, before any weights load or anything compiles
    images_in, init_image, strength = check_image_inputs(args, cascade)  # the files read now: bad ones fail here
    if loras and images_in and not cascade:
        raise ValueError("--lora adapts the prior, which v2 image variation (--image) does not run; drop --lora")

    import jax.numpy as jnp

    import wurst_jax as wj

    if args.distributed or args.coordinator:
        wj.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    use_compilation_cache(args.cache_dir, enabled=not args.no_cache)
    mesh = wj.make_mesh(data=-1, model=args.model_axis) if args.sharding or args.model_axis > 1 else None
    out = plan.out
    out.parent.mkdir(exist_ok=True)  # check_generate allows one missing level, never a tree
    tiny_warnings(plan, args.prompt)
    opts = dict(dtype=getattr(jnp, args.dtype), offload=args.offload, progress=not args.quiet, mesh=mesh)
    opts["variant"] = args.variant
    common = dict(
        height=plan.height,
        width=plan.width,
        prior_guidance_scale=args.prior_guidance,
        decoder_guidance_scale=plan.spec.default_decoder_guidance
        if args.decoder_guidance is None
        else args.decoder_guidance,
        negative_prompt=args.negative_prompt,
    )
    init = {} if init_image is None else dict(strength=strength)
    if cascade:
        pipe = wj.StableCascadeCombinedPipeline.from_pretrained(
            decoder=plan.model, prior=plan.prior, sharding=args.sharding, **opts, **control_load
        )
        steps = dict(
            images=images_in or None,
            prior_num_inference_steps=args.prior_steps or 20,
            num_inference_steps=args.steps or 10,
            **control_call,
            **(init and dict(init_image=init_image, **init)),
        )
    elif images_in:  # v2 image variation: the image's EfficientNet latents → the decoder; no prior
        pipe = wj.WuerstchenDecoderPipeline.from_pretrained(plan.model, sharding=args.sharding, **opts)
        pipe.resolution_multiple = plan.spec.resolution_multiple  # the prior folder's grid rule, as text-to-image
        common = dict(
            image=images_in[0],
            height=plan.height,
            width=plan.width,
            num_inference_steps=args.steps or 12,
            guidance_scale=common["decoder_guidance_scale"],
            negative_prompt=args.negative_prompt,
        )
        steps = {}
    else:
        pipe = wj.WuerstchenPipeline.from_pretrained(
            decoder=plan.model, prior=plan.prior, sharding=args.sharding, **opts
        )
        steps = dict(
            prior_num_inference_steps=args.prior_steps or 60,
            prior_timesteps=None if args.prior_steps else DEFAULT_STAGE_C_TIMESTEPS,
            num_inference_steps=args.steps or 12,
            **(init and dict(image=init_image, **init)),
        )
    load_loras(pipe, loras)
    if args.effnet is not None and (init_image is not None or (images_in and not cascade)):  # not for sr alone
        pipe.load_effnet(args.effnet, opts["dtype"])
    images, done = [], 0
    if len(plan.batches) > 1 and not args.quiet:
        print(f"wurst-jax generate: {sum(plan.batches)} images in {len(plan.batches)} batches of up to "
              f"{max(plan.batches)}", file=sys.stderr)  # fmt: skip
    for n in plan.batches:  # several batches: image i gets seed + i, whatever the batch size
        seed = args.seed if len(plan.batches) == 1 else [args.seed + done + i for i in range(n)]
        call = dict(prompt=args.prompt, num_images_per_prompt=n, seed=seed, **steps, **common)
        if done == 0 and mesh is None and isinstance(pipe, wj.WuerstchenPipeline) and init_image is None:
            # a dry run first: every stage's program lowered, all compiled side by side (runtime.CompileCache)
            with pipe.prior_pipe.compiler.planning():
                pipe(**call)
        images += pipe(**call).images
        done += n
    if args.control == "inpaint" and args.keep_unmasked is not False:
        images = keep_unmasked(images, control_call)
    return _save(images, out)


def _save(images: list, out: Path) -> int:
    import jax

    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    if jax.process_index() != 0:  # every process holds all images; one writes them
        return 0
    for image, path in zip(images, paths, strict=True):
        image.save(path)
        print(path)
    return 0
