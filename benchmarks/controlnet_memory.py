"""Memory per device of stage C + a ControlNet in bf16, from `jax.eval_shape` only (nothing is allocated): the
released 3.6B stage C (`StableCascadeUNetConfig.stage_c()`) with each released ControlNet config (canny,
inpainting: EfficientNetV2-S; sr: the large bottleneck, plus the EfficientNet encoder the sr filter runs).

Inference: the weights in bf16 (stage C, ControlNet; the sr filter's encoder in f32, as the pipeline loads it).
Training (`wurst-jax train --stage c-controlnet`, one device, `dtype` bfloat16): the train state of
`build_train_setup(..., trainable=TRAINABLE, allocate=False)` — stage C frozen in bf16, the ControlNet's f32
master weights, its EMA and Adam's two moments — plus one f32 gradient of the ControlNet. Activations are not
counted (they depend on batch and size; `remat` bounds stage C's).

Usage (repo root):  python benchmarks/controlnet_memory.py [--no-write]
The table is appended to benchmarks/RESULTS.md unless `--no-write`.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import jax
import jax.numpy as jnp

from wurst_jax.controlnet.training import TRAINABLE, controlnet_loss, controlnet_variables
from wurst_jax.models import abstract_variables, example_inputs
from wurst_jax.models.cascade import ControlNetConfig, StableCascadeControlNet, StableCascadeUNet
from wurst_jax.models.cascade.config import StableCascadeUNetConfig
from wurst_jax.models.effnet import EfficientNetConfig, EfficientNetEncoder
from wurst_jax.train.config import RunConfig
from wurst_jax.train.setup import build_train_setup

OUT = Path(__file__).parent
GIB = 2**30


def nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def rows() -> list[tuple[str, float, float, float, float]]:
    """(ControlNet, stage C GiB, ControlNet GiB, inference GiB, training GiB) per released config."""
    bf16 = jnp.bfloat16
    unet = StableCascadeUNet(StableCascadeUNetConfig.stage_c(), dtype=bf16, param_dtype=bf16)
    unet_abs = abstract_variables(unet)
    stage_c = nbytes(unet_abs["params"])
    effnet = nbytes(abstract_variables(EfficientNetEncoder(EfficientNetConfig(mapper_affine=False))))
    out = []
    for name, cfg in (("canny", ControlNetConfig.canny()), ("inpainting", ControlNetConfig.inpainting()),
                      ("sr", ControlNetConfig.sr())):  # fmt: skip
        cn_bf16 = abstract_variables(StableCascadeControlNet(cfg, dtype=bf16, param_dtype=bf16))
        cn = StableCascadeControlNet(cfg, dtype=bf16)  # f32 master weights, bf16 compute (as the trainer)
        cn_abs = abstract_variables(cn)
        extra = effnet if name == "sr" else 0
        setup = build_train_setup(
            controlnet_loss(unet, cn),
            lambda cn=cn, cfg=cfg: controlnet_variables(
                unet.init(jax.random.key(0), *_unet_inputs(unet)).get("params"), cn.init(jax.random.key(1), _cond(cfg))
            ),
            RunConfig(),
            trainable=TRAINABLE,
            allocate=False,
        )
        train = nbytes(setup.abstract) + nbytes(cn_abs["params"]) + extra  # + one f32 gradient of the ControlNet
        out.append((name, stage_c / GIB, nbytes(cn_bf16) / GIB, (stage_c + nbytes(cn_bf16) + extra) / GIB, train / GIB))
    return out


def _unet_inputs(unet):
    return [jnp.zeros(s.shape, s.dtype) for s in example_inputs(unet)]


def _cond(cfg: ControlNetConfig):
    return jnp.zeros((1, 64, 64, cfg.c_in), jnp.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"## ControlNet memory per device · {when} · jax.eval_shape, 3.6B stage C (bf16) + released ControlNets",
        "",
        "| ControlNet | stage C bf16 GiB | ControlNet bf16 GiB | inference GiB | training state GiB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.2f} | {b:.3f} | {c:.2f} | {d:.2f} |" for n, a, b, c, d in rows()]
    lines += [
        "",
        "Inference: the weights (sr: + the f32 EfficientNet encoder of its filter). Training: stage C frozen in bf16 "
        "+ the ControlNet's f32 weights, EMA, Adam moments and one f32 gradient; activations not included.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with open(OUT / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
