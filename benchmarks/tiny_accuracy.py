"""Score the tiny model on prompt combinations it never saw in training (and on seen ones, for contrast).

Usage: python benchmarks/tiny_accuracy.py [--model DIR --prior DIR] [--per-combination 8] [--out-dir benchmarks]
Default model: the one shipped in wurst_jax/assets/tiny. Prompts: "a {colour} {shape} on a {colour} background"
for the 12 held-out (colour, shape, background) combinations; images scored by wurst_jax.tiny.checker.
Targets (the training issue): colour ≥ 90 %, shape ≥ 75 %, background ≥ 90 % on held-out combinations.
"""

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

import wurst_jax as wj
from wurst_jax.cli.generate import model_defaults
from wurst_jax.serving.backend import TINY_MODEL
from wurst_jax.tiny.checker import score
from wurst_jax.tiny.data import Scene, heldout_combinations, train_combinations


def evaluate(pipe, combos, per, seed, size, prior_guidance=4.0, decoder_guidance=0.0):
    prompts = [Scene(c, s, b).captions()[0] for c, s, b in combos]
    images = pipe(
        prompts,
        height=size,
        width=size,
        prior_timesteps=wj.DEFAULT_STAGE_C_TIMESTEPS,
        prior_guidance_scale=prior_guidance,
        decoder_guidance_scale=decoder_guidance,
        num_inference_steps=12,
        num_images_per_prompt=per,
        seed=seed,
        output_type="np",
    ).images
    targets = [p for p in prompts for _ in range(per)]
    return score(images, targets), images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(TINY_MODEL / "wuerstchen"))
    ap.add_argument("--prior", default=str(TINY_MODEL / "wuerstchen-prior"))
    ap.add_argument("--per-combination", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument(
        "--decoder-guidance", type=float, default=None, help="default: the model's, as `wurst-jax generate` takes it"
    )
    ap.add_argument("--out-dir", default=str(Path(__file__).parent))
    a = ap.parse_args()
    if a.decoder_guidance is None:
        a.decoder_guidance = model_defaults(Path(a.model))[1]
    pipe = wj.WuerstchenPipeline.from_pretrained(a.model, a.prior, progress=False)
    rng = np.random.default_rng(a.seed)
    seen = [train_combinations()[i] for i in rng.choice(len(train_combinations()), 12, replace=False)]
    t0 = time.perf_counter()
    g = (a.prior_guidance, a.decoder_guidance)
    held, images = evaluate(pipe, heldout_combinations(), a.per_combination, a.seed, a.size, *g)
    train, _ = evaluate(pipe, seen, a.per_combination, a.seed, a.size, *g)
    secs = time.perf_counter() - t0
    out = Path(a.out_dir)
    np.save(out / "tiny_heldout_samples.npy", (images[:: a.per_combination] * 255).round().astype(np.uint8))
    command = shlex.join(["python", "benchmarks/tiny_accuracy.py", *sys.argv[1:]])
    row = lambda name, r: (
        f"| {name} | {r['n']} | {r['colour']:.1%} | {r['shape']:.1%} | {r['background']:.1%} | {r['all']:.1%} |"
    )
    lines = [
        f"\n## Tiny model: held-out prompt accuracy ({datetime.date.today()})\n",
        f"Device {jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}; model {a.model}; "
        f"{a.per_combination} images per combination, {a.size}², 29 prior steps (guidance {a.prior_guidance:g}), "
        f"12 decoder steps (guidance {a.decoder_guidance:g}); "
        f"{secs:.0f} s for both rows. Command: `{command}`.\n",
        "| prompts | images | colour | shape | background | all three |",
        "|---|---|---|---|---|---|",
        row("held-out combinations (never trained on)", held),
        row("12 training combinations", train),
        "\nTargets on held-out combinations: colour ≥ 90 %, shape ≥ 75 %, background ≥ 90 %.\n",
    ]
    print("\n".join(lines))
    with open(out / "RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    with open(out / "results.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "implementation": "wurst_jax-tiny",
                    "benchmark": "heldout_accuracy",
                    "device": jax.devices()[0].device_kind,
                    "date": str(datetime.date.today()),
                    "heldout": held,
                    "train": train,
                    "model": a.model,
                    "per_combination": a.per_combination,
                    "prior_guidance": a.prior_guidance,
                    "decoder_guidance": a.decoder_guidance,
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
