"""`StableCascadeUNet` (Stable Cascade stage C / stage B) against diffusers 0.42's `StableCascadeUNet`.

Random torch weights (every parameter, diffusers zero-initialises several) → `save_pretrained` → the project's
converter → the same outputs, at two odd small configs: a prior (text + pooled + image conditioning, sca/crp,
strided conv scalers, a down repeat mapper) and a decoder (effnet + pixels, patch 2, up repeat mappers,
switch_level scalers, attention only at the deeper levels, a cross-attention-only level). Also: the released
configs' parameter counts, scan/remat = unrolled (outputs and gradients), bf16 compute, dtypes, config checks.
"""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import nchw, nhwc, randomize, rel_err
from jax.sharding import PartitionSpec

from wurst_jax.models.cascade import (
    StableCascadeUNet,
    StableCascadeUNetConfig,
    abstract_params,
    example_inputs,
    param_count,
)
from wurst_jax.models.cascade.blocks import resize_bilinear
from wurst_jax.sharding import make_mesh, param_specs
from wurst_jax.weights.mapping import state_dict_source, to_variables

R, T, A = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
TOL = 1e-4
# XLA's LLVM backend at -O0 compiles the gradient graphs 2-4x faster, but its elementwise functions are less exact
# (1e-5 instead of 1e-6 against diffusers): only for comparing our own execution paths with each other.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

PRIOR = StableCascadeUNetConfig(
    in_channels=6,
    out_channels=5,
    timestep_ratio_embedding_dim=8,
    patch_size=1,
    conditioning_dim=24,
    block_out_channels=(16, 24),
    num_attention_heads=(2, 3),
    down_num_layers_per_block=(1, 1),
    up_num_layers_per_block=(1, 2),  # up order: level 0 runs its skip-taking first repeat and one more
    down_blocks_repeat_mappers=(1, 2),
    up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=((R, T, A), (R, T, A)),
    clip_text_in_channels=12,
    clip_text_pooled_in_channels=10,
    clip_image_in_channels=14,
    clip_seq=3,
    dropout=(0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca", "crp"),
    switch_level=None,  # strided conv / transposed conv scalers (as stage B)
)
DECODER = StableCascadeUNetConfig(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=9,  # odd: the embedding is zero-padded
    patch_size=2,
    conditioning_dim=20,
    block_out_channels=(8, 16, 24),
    num_attention_heads=(0, 2, 4),
    down_num_layers_per_block=(1, 1, 1),
    up_num_layers_per_block=(1, 2, 1),
    down_blocks_repeat_mappers=(1, 1, 1),
    up_blocks_repeat_mappers=(3, 2, 2),  # up order: levels 2, 1, 0
    block_types_per_layer=((R, T), (R, T, A), (R, T, A)),
    clip_text_pooled_in_channels=12,
    clip_seq=2,
    effnet_in_channels=6,
    pixel_mapper_in_channels=3,
    kernel_size=5,
    dropout=(0.0, 0.1, 0.1),
    self_attn=(True, True, False),
    timestep_conditioning_type=("sca",),
    switch_level=(True, False),  # bilinear halving into level 1, a 1×1 conv only into level 2 (as stage C)
)


def torch_config(cfg: StableCascadeUNetConfig) -> dict:
    """The config as diffusers' constructor gets it from a config.json (lists)."""
    listed = lambda v: [listed(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
    return {k: listed(v) for k, v in dataclasses.asdict(cfg).items()}


@functools.cache
def reference(role: str, tmp_root: str):
    """(torch model, our module, converted variables): random weights saved with save_pretrained, read back."""
    from diffusers import StableCascadeUNet as TorchUNet

    cfg = PRIOR if role == "prior" else DECODER
    ref = randomize(TorchUNet(**torch_config(cfg)), seed=1 if role == "prior" else 2)
    folder = f"{tmp_root}/{role}"
    ref.save_pretrained(folder)
    with open(f"{folder}/config.json") as f:
        raw = json.load(f)
    loaded = StableCascadeUNetConfig(**{k.name: raw[k.name] for k in dataclasses.fields(StableCascadeUNetConfig)})
    assert loaded == cfg and hash(loaded) == hash(cfg)  # nested lists normalised to tuples
    sd = safetensors.numpy.load_file(f"{folder}/diffusion_pytorch_model.safetensors")
    variables = to_variables(state_dict_source(sd), {"params": abstract_params(cfg)}, folder)
    return ref, StableCascadeUNet(loaded), variables


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cascade"))


def prior_inputs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 5, 7, 6), np.float32)  # odd, non-square: the up path resizes to the skip
    r = np.linspace(0.9, 0.3, b).astype(np.float32)
    pooled = rng.standard_normal((b, 1, 10), np.float32)
    text = rng.standard_normal((b, 5, 12), np.float32)
    img = rng.standard_normal((b, 2, 14), np.float32)
    return x, r, pooled, text, img


def decoder_inputs(b=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 10, 14, 4), np.float32)  # level 0 at 5×7: halved to 2×3, up to 4×6, resized
    r = np.linspace(0.2, 0.7, b).astype(np.float32)
    pooled = rng.standard_normal((b, 1, 12), np.float32)
    effnet = rng.standard_normal((b, 3, 4, 6), np.float32)  # smaller than the 5×7 first level
    pixels = rng.random((b, 6, 5, 3), dtype=np.float32)
    return x, r, pooled, effnet, pixels


def torch_run(ref, **kw) -> np.ndarray:
    t = lambda v: None if v is None else torch.from_numpy(np.ascontiguousarray(v))  # noqa: E731
    spatial = ("sample", "effnet", "pixels")
    args = {k: (nchw(v) if k in spatial and v is not None else t(v)) for k, v in kw.items()}
    with torch.no_grad():
        return nhwc(ref(**args).sample)


def torch_per_sample(ref, **kw) -> np.ndarray:
    """diffusers crashes on a batch of sca / crp values (`cond or zeros` on a tensor): one sample at a time."""
    return np.concatenate(
        [
            torch_run(ref, **{k: None if v is None else v[i : i + 1] for k, v in kw.items()})
            for i in range(len(kw["sample"]))
        ]
    )


# ---------------------------------------------------------------- parity with diffusers


def test_prior_matches_diffusers_with_per_sample_sca_crp(root):
    ref, module, variables = reference("prior", root)
    x, r, pooled, text, img = prior_inputs()
    sca, crp = np.array([0.25, 0.8], np.float32), np.array([0.6, 0.1], np.float32)
    want = torch_per_sample(
        ref, sample=x, timestep_ratio=r, clip_text_pooled=pooled, clip_text=text, clip_img=img, sca=sca, crp=crp
    )
    got = jax.jit(module.apply)(variables, x, r, pooled, text, img, sca=sca, crp=crp)
    assert got.shape == (2, 5, 7, 5)
    err = rel_err(got, want)
    print(f"prior rel err {err:.2e}")
    assert err < TOL
    # the per-sample values matter: swapping them changes both samples
    swapped = jax.jit(module.apply)(variables, x, r, pooled, text, img, sca=sca[::-1], crp=crp[::-1])
    assert all(rel_err(swapped[i], want[i]) > 1e-3 for i in range(2))


def test_prior_without_sca_crp_uses_zeros(root):
    ref, module, variables = reference("prior", root)
    x, r, pooled, text, img = prior_inputs(seed=3)
    # batched torch call: sca / crp None take diffusers' zeros path. 2-D pooled / image embeddings are one token
    # each (diffusers reads a 2-D image embedding so, but crashes on a 2-D pooled one: 3-D for torch)
    want = torch_run(ref, sample=x, timestep_ratio=r, clip_text_pooled=pooled, clip_text=text, clip_img=img[:, 0])
    got = jax.jit(module.apply)(variables, x, r, pooled[:, 0], text, img[:, 0])
    assert rel_err(got, want) < TOL


def test_decoder_matches_diffusers_with_pixels_and_per_sample_sca(root):
    ref, module, variables = reference("decoder", root)
    x, r, pooled, effnet, pixels = decoder_inputs()
    sca = np.array([0.4, 0.05], np.float32)
    want = torch_per_sample(
        ref, sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet, pixels=pixels, sca=sca
    )
    got = jax.jit(module.apply)(variables, x, r, pooled, None, None, effnet, pixels, sca)
    assert got.shape == x.shape
    err = rel_err(got, want)
    print(f"decoder (pixels, sca) rel err {err:.2e}")
    assert err < TOL


def test_decoder_matches_diffusers_as_the_pipeline_calls_it(root):
    """No pixels (zeros [B, 8, 8, 3]) and no sca (zeros): diffusers' decoder pipeline call, batched."""
    ref, module, variables = reference("decoder", root)
    x, r, pooled, effnet, _ = decoder_inputs(seed=4)
    want = torch_run(ref, sample=x, timestep_ratio=r, clip_text_pooled=pooled, effnet=effnet)
    got = jax.jit(module.apply)(variables, x, r, pooled, effnet=effnet)
    err = rel_err(got, want)
    print(f"decoder (no pixels, no sca) rel err {err:.2e}")
    assert err < TOL


def test_bf16_compute_is_close_to_float32(root):
    """bf16 compute on the float32 weights: finite and within a few % of diffusers' float32 output."""
    ref, module, variables = reference("prior", root)
    x, r, pooled, text, img = prior_inputs(seed=5)
    want = torch_run(ref, sample=x, timestep_ratio=r, clip_text_pooled=pooled, clip_text=text, clip_img=img)
    got = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x, r, pooled, text, img)
    assert got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
    err = rel_err(got, want)
    print(f"bf16 vs f32 rel err {err:.2e}")
    assert err < 0.03


@pytest.mark.parametrize(
    "size_in,size_out", [((1, 3), (3, 1)), ((5, 7), (7, 5)), ((4, 6), (8, 12)), ((24, 13), (7, 64))]
)
def test_resize_bilinear_matches_torch(rng, size_in, size_out):
    x = rng.standard_normal((2, *size_in, 3), np.float32)
    want = torch.nn.functional.interpolate(nchw(x), size=size_out, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(resize_bilinear(x, size_out), nhwc(want), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- sizes, dtypes, configs

RELEASED = {
    "stage_c": 3_589_103_632,
    "stage_c_lite": 1_030_785_040,
    "stage_b": 1_562_941_136,
    "stage_b_lite": 699_471_248,
}


def test_released_parameter_counts():
    """Through jax.eval_shape: nothing allocated. The figures are diffusers' (its class on the meta device)."""
    assert {name: param_count(getattr(StableCascadeUNetConfig, name)()) for name in RELEASED} == RELEASED


@pytest.mark.parametrize("preset", ["tiny_prior", "tiny_decoder"])
def test_params_are_stored_in_param_dtype_with_logical_axes(preset):
    cfg = getattr(StableCascadeUNetConfig, preset)()
    module = StableCascadeUNet(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    boxed = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *example_inputs(cfg))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)  # so dp / fsdp / tp can place them
    tp = param_specs({"params": boxed}, make_mesh(data=4, model=2), "tp")["params"]
    assert tp["down_blocks_1_2"]["attention"]["to_q"]["kernel"] == PartitionSpec(None, "model")  # heads split
    assert tp["down_blocks_1_0"]["channelwise_4"]["kernel"] == PartitionSpec("model", None)  # MLP rows split
    params = nn.meta.unbox(boxed)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.eval_shape(module.apply, {"params": params}, *example_inputs(cfg))
    assert (out.shape, out.dtype) == (example_inputs(cfg)[0].shape, jnp.float32)  # the sample's dtype


def test_config_normalises_lists_and_stays_hashable():
    cfg = StableCascadeUNetConfig(**torch_config(StableCascadeUNetConfig.stage_b()))
    assert cfg == StableCascadeUNetConfig.stage_b() and hash(cfg) == hash(StableCascadeUNetConfig.stage_b())
    assert isinstance(cfg.block_types_per_layer[0], tuple) and cfg.level_dropout == (0.0, 0.0, 0.1, 0.1)
    assert StableCascadeUNetConfig(dropout=0.2, self_attn=False).level_self_attn == (False, False)
    assert StableCascadeUNetConfig.stage_c().downscale == 1 and StableCascadeUNetConfig.stage_b().downscale == 16


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_attention_heads=(32,)), "num_attention_heads has 1 entries; it needs 2"),
        (dict(up_blocks_repeat_mappers=(1, 0)), "up_blocks_repeat_mappers must be >= 1"),
        (dict(block_types_per_layer=((R, "Conv"), (R,))), "unknown block type"),
        (dict(num_attention_heads=(32, 30)), r"num_attention_heads\[1\]=30 must be >= 1 and divide"),
        (dict(switch_level=(False, True)), "switch_level needs 1 entries"),
        (dict(dropout=(0.1, 0.1, 0.1)), "dropout needs one value or 2"),
        (dict(clip_text_in_channels=1280), "clip_text_in_channels and clip_image_in_channels"),
        (dict(timestep_conditioning_type=("sca_2",)), "invalid name"),
    ],
)
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        StableCascadeUNetConfig(**change)


@pytest.mark.parametrize(
    "preset,change,match",
    [
        ("tiny_prior", dict(clip_img=None), "clip_text and clip_img together"),
        ("tiny_prior", dict(effnet=(1, 2, 2, 16)), "effnet was given, but this config has no mapper"),
        ("tiny_prior", dict(sca=(3,)), r"sca must be a scalar or have shape \[1\]"),
        ("tiny_decoder", dict(crp=0.5), "crp was given, but timestep_conditioning_type is"),
        ("tiny_decoder", dict(sample=(1, 6, 8, 4)), "at least 8"),
        ("tiny_decoder", dict(sample=(1, 16, 15, 4)), "multiples of patch_size=2"),
    ],
)
def test_bad_inputs_raise_one_clear_error(preset, change, match):
    cfg = getattr(StableCascadeUNetConfig, preset)()
    module = StableCascadeUNet(cfg)
    names = ("sample", "timestep_ratio", "clip_text_pooled", "clip_text", "clip_img", "effnet")
    kw = dict(zip(names, example_inputs(cfg), strict=False))
    kw.update(
        {k: v if v is None or isinstance(v, float) else jax.ShapeDtypeStruct(v, jnp.float32) for k, v in change.items()}
    )
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(module.apply, {"params": abstract_params(cfg)}, **kw)


# ---------------------------------------------------------------- scan_blocks / remat


def tiny_inputs(role: str):
    rng = np.random.default_rng(7)
    f = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    r, sca = np.array([0.8, 0.3], np.float32), np.array([0.1, 0.6], np.float32)
    if role == "prior":  # level 1 scans 2 repeats down and up; level 0's single up repeat takes the skip
        return (f(2, 5, 6, 16), r, f(2, 1, 12), f(2, 3, 12), f(2, 1, 10)), dict(sca=sca, crp=sca[::-1])
    # level 2 scans 2 repeats on 2 passes; level 1: the skip-taking repeat, then 1 scanned, on 2 passes
    return (f(2, 10, 18, 4), r, f(2, 1, 12), None, None, f(2, 3, 3, 16)), dict(sca=sca)


def value_and_grad(role: str, **options):
    cfg = getattr(StableCascadeUNetConfig, f"tiny_{role}")()
    module = StableCascadeUNet(cfg, **options)
    args, kw = tiny_inputs(role)

    def loss(params):
        out = module.apply({"params": params}, *args, **kw)
        return jnp.mean(jnp.square(out)), out

    return fast_jit(jax.value_and_grad(loss, has_aux=True))


@functools.cache
def unrolled(role: str):
    """Random parameters (no zero-initialised leaf), and the default path's output and gradients."""
    leaves, treedef = jax.tree_util.tree_flatten(abstract_params(getattr(StableCascadeUNetConfig, f"tiny_{role}")()))
    rng = np.random.default_rng(3)  # numpy: jax.random would compile a kernel per leaf shape
    params = treedef.unflatten([jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32)) for x in leaves])
    (_, out), grads = value_and_grad(role)(params)
    return params, out, grads


@pytest.mark.parametrize(
    "role,options",
    [
        ("prior", dict(scan_blocks=True, remat=True)),
        ("decoder", dict(scan_blocks=True, remat=True)),
        ("prior", dict(remat=True)),
    ],
    ids=str,
)
def test_scan_and_remat_equal_the_unrolled_path(role, options):
    params, want, g_want = unrolled(role)
    (_, got), g_got = value_and_grad(role, **options)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_want))
    pairs = zip(jax.tree_util.tree_leaves_with_path(g_want), jax.tree_util.tree_leaves(g_got), strict=True)
    for (path, gw), gg in pairs:
        np.testing.assert_allclose(gg, gw, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
