"""The released full-size presets, checked abstractly: `jax.eval_shape` only, torch models on the meta device."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

import wurst_jax as wj
from wurst_jax.models import abstract_variables, param_count

# Documented configs of the released checkpoints (warp-ai/wuerstchen-prior; the prior and decoder text towers).
PRIOR_CONFIG = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    eos_token_id=2,  # laion's bigG configs carry the legacy value (the legacy pooling rule)
)
CLIP_H = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=1024,
    eos_token_id=49407,
)
CLIP_COMMON = dict(max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)

# name: (our module, the torch reference built on the meta device, exact parameter count)
PRESETS = {
    "prior": (
        lambda **kw: wj.WuerstchenPrior(wj.StageCConfig.v2(), **kw),
        lambda: WuerstchenPrior(**PRIOR_CONFIG),
        993_636_896,
    ),
    "decoder": (
        lambda **kw: wj.WuerstchenDiffNeXt(wj.StageBConfig.v2(), **kw),
        lambda: WuerstchenDiffNeXt(),
        1_055_365_280,
    ),
    "vqgan": (lambda **kw: wj.PaellaVQModel(wj.StageAConfig.v2(), **kw), lambda: PaellaVQModel(), 18_406_894),
    "clip_bigg": (
        lambda **kw: wj.CLIPTextModel(wj.CLIPTextConfig.vit_bigg(), **kw),
        lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_BIGG, **CLIP_COMMON)),
        693_021_440,
    ),
    "clip_h": (
        lambda **kw: wj.CLIPTextModel(wj.CLIPTextConfig.vit_h(), **kw),
        lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_H, **CLIP_COMMON)),
        352_984_064,
    ),
}


@functools.cache
def module_and_variables(name):
    module = PRESETS[name][0]()
    return module, abstract_variables(module)


@functools.cache
def torch_meta(name):
    with torch.device("meta"):
        return PRESETS[name][1]()


def diffusers_config(model) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model.config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(PRESETS))
def test_exact_parameter_count_matches_torch(name):
    want = PRESETS[name][2]
    ref = torch_meta(name)
    assert next(ref.parameters()).device.type == "meta"
    assert sum(p.numel() for p in ref.parameters()) == want
    assert param_count(PRESETS[name][0]()) == want


def test_configs_equal_the_released_ones():
    assert dataclasses.asdict(wj.StageCConfig.v2()) == PRIOR_CONFIG == diffusers_config(torch_meta("prior"))
    assert dataclasses.asdict(wj.StageBConfig.v2()) == diffusers_config(torch_meta("decoder"))
    assert dataclasses.asdict(wj.StageAConfig.v2()) == diffusers_config(torch_meta("vqgan"))
    for ours, documented, name in [
        (wj.CLIPTextConfig.vit_bigg(), CLIP_BIGG, "clip_bigg"),
        (wj.CLIPTextConfig.vit_h(), CLIP_H, "clip_h"),
    ]:
        assert dataclasses.asdict(ours) == {**documented, **CLIP_COMMON}
        ref = torch_meta(name).config
        assert all(getattr(ref, k) == v for k, v in dataclasses.asdict(ours).items())


def sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("height,width", [(1024, 1024), (1024, 2048)])
def test_stage_output_shapes(height, width):
    # The pipelines' latent sizes: prior ceil(H / 42.67), decoder int(prior * 10.67), VQGAN latent = pixels / 4.
    h, w = math.ceil(height / 42.67), math.ceil(width / 42.67)
    dh, dw = int(h * 10.67), int(w * 10.67)
    assert (h, w, dh, dw) == {1024: (24, 24, 256, 256), 2048: (24, 48, 256, 512)}[width]

    prior, pv = module_and_variables("prior")
    out = jax.eval_shape(prior.apply, pv, sds(2, h, w, 16), sds(2), sds(2, 77, 1280))
    assert (out.shape, out.dtype) == ((2, h, w, 16), jnp.float32)

    decoder, dv = module_and_variables("decoder")
    out = jax.eval_shape(decoder.apply, dv, sds(1, dh, dw, 4), sds(1), sds(1, h, w, 16), sds(1, 77, 1024))
    assert (out.shape, out.dtype) == ((1, dh, dw, 4), jnp.float32)

    vqgan, av = module_and_variables("vqgan")
    image = jax.eval_shape(functools.partial(vqgan.apply, method="decode"), av, sds(1, dh, dw, 4))
    assert image.shape == (1, height, width, 3) == (1, 4 * dh, 4 * dw, 3)
    latent = jax.eval_shape(functools.partial(vqgan.apply, method="encode"), av, image)
    assert latent.shape == (1, dh, dw, 4)


@pytest.mark.parametrize("name,width", [("clip_bigg", 1280), ("clip_h", 1024)])
def test_clip_output_shapes(name, width):
    module, variables = module_and_variables(name)
    ids = sds(1, 77, dtype=jnp.int32)
    assert jax.eval_shape(module.apply, variables, ids).shape == (1, 77, width)
    assert jax.eval_shape(module.apply, variables, ids, ids).shape == (1, 77, width)


@functools.cache
def bf16_variables(name):
    return abstract_variables(PRESETS[name][0](param_dtype=jnp.bfloat16))


@pytest.mark.parametrize("name", list(PRESETS))
def test_bf16_batch_stats_stay_float32(name):
    """Normalisation statistics are kept in float32 by design (only Stage A has them)."""
    stats = bf16_variables(name).get("batch_stats", {})
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(stats)} <= {jnp.dtype(jnp.float32)}
    assert bool(stats) == (name == "vqgan")


@pytest.mark.parametrize("name", list(PRESETS))
def test_bf16_param_dtype_covers_every_param(name):
    variables = bf16_variables(name)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables["params"])} == {jnp.dtype(jnp.bfloat16)}
