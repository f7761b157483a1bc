"""Tiny random Stable Cascade pipelines saved by diffusers in the two Hub layouts (no Hub access).

`build(root)` writes `root/stable-cascade-prior` (prior/, text_encoder/, tokenizer/, scheduler/, image_encoder/,
feature_extractor/) and `root/stable-cascade` (decoder/, vqgan/, text_encoder/, tokenizer/, scheduler/) with
`save_pretrained`, and returns the diffusers pipelines built from the same torch modules. `mini_prior` /
`mini_decoder` are smaller UNets (for tests that compile many programs) whose heads split over a 2-way model axis.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from conftest import clip_tokenizer, randomize, torch_vqgan

from wurst_jax.models.cascade import StableCascadeUNetConfig
from wurst_jax.models.cascade.config import ATTN, RES, TIMESTEP

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


def mini_prior() -> StableCascadeUNetConfig:
    """`tiny_prior` cut to one level with 2 heads: compiles in a fraction of the time, and every head count of the
    pipeline (this 2, the text and image encoders' 4) splits over a 2-way tensor-parallel axis."""
    return dataclasses.replace(
        StableCascadeUNetConfig.tiny_prior(),
        block_out_channels=(16,),
        num_attention_heads=(2,),
        down_num_layers_per_block=(1,),
        up_num_layers_per_block=(1,),
        down_blocks_repeat_mappers=(1,),
        up_blocks_repeat_mappers=(1,),
        block_types_per_layer=((RES, TIMESTEP, ATTN),),
        dropout=(0.0,),
        switch_level=None,
    )


def mini_decoder() -> StableCascadeUNetConfig:
    """`tiny_decoder` cut to two levels (attention, 2 heads, at the second): downscale 4, heads split over 2."""
    return dataclasses.replace(
        StableCascadeUNetConfig.tiny_decoder(),
        block_out_channels=(8, 16),
        num_attention_heads=(0, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=((RES, TIMESTEP), (RES, TIMESTEP, ATTN)),
        dropout=(0.0, 0.0),
    )


def unet(cfg: StableCascadeUNetConfig, seed: int):
    from diffusers import StableCascadeUNet

    listed = lambda v: [listed(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
    return randomize(StableCascadeUNet(**{k: listed(v) for k, v in dataclasses.asdict(cfg).items()}), seed, 0.1)


def build(root: Path, prior_config: StableCascadeUNetConfig = None, decoder_config: StableCascadeUNetConfig = None):
    """The two folders (and diffusers' pipelines); the UNets default to `tiny_prior` / `tiny_decoder`."""
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
    prior = unet(prior_config or StableCascadeUNetConfig.tiny_prior(), 4)
    decoder = unet(decoder_config or StableCascadeUNetConfig.tiny_decoder(), 5)
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
