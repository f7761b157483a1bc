"""Tiny random Stable Cascade pipelines saved by diffusers in the two Hub layouts (no Hub access).

`build(root)` writes `root/stable-cascade-prior` (prior/, text_encoder/, tokenizer/, scheduler/, image_encoder/,
feature_extractor/) and `root/stable-cascade` (decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/) with
`save_pretrained`, and returns the diffusers pipelines built from the same torch modules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from conftest import clip_tokenizer, randomize, torch_vqgan

from wurst_jax.models.cascade import StableCascadeUNetConfig

# the text encoders' hidden size and projection are the tiny UNets' clip_text / pooled channels (12)
TEXT = dict(
    vocab_size=49408,
    hidden_size=12,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=12,
    eos_token_id=49407,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=10,  # tiny_prior's clip_image_in_channels
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)


def unet(cfg: StableCascadeUNetConfig, seed: int):
    from diffusers import StableCascadeUNet

    listed = lambda v: [listed(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
    return randomize(StableCascadeUNet(**{k: listed(v) for k, v in dataclasses.asdict(cfg).items()}), seed, 0.1)


def build(root: Path) -> dict:
    import transformers
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeCombinedPipeline,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
    )

    tok = clip_tokenizer(root / "tok")
    te_prior = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)), 1, 0.1)
    te_dec = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)), 2, 0.1)
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION))
    vision = randomize(vision, 3, 0.1)
    features = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    prior = unet(StableCascadeUNetConfig.tiny_prior(), 4)
    decoder = unet(StableCascadeUNetConfig.tiny_decoder(), 5)
    vqgan = torch_vqgan(seed=6)
    with torch.no_grad():  # untrained stages give decoder latents of ~100: scale the VQGAN's input so that the
        vqgan.up_blocks[0][0].weight.mul_(0.01)  # images are not all clamped to 0 / 1 (parity on real values)
    s = DDPMWuerstchenScheduler()
    prior_pipe = StableCascadePriorPipeline(tok, te_prior, prior, s, feature_extractor=features, image_encoder=vision)
    decoder_pipe = StableCascadeDecoderPipeline(decoder, tok, te_dec, s, vqgan)
    prior_pipe.save_pretrained(root / "stable-cascade-prior")
    decoder_pipe.save_pretrained(root / "stable-cascade")
    combined = StableCascadeCombinedPipeline(
        tok, te_dec, decoder, s, vqgan, prior, te_prior, tok, s, prior_feature_extractor=features,
        prior_image_encoder=vision,
    )  # fmt: skip
    for p in (prior_pipe, decoder_pipe, combined):
        p.set_progress_bar_config(disable=True)
    return {"prior": prior_pipe, "decoder": decoder_pipe, "combined": combined}
