"""Every building block against its diffusers / PyTorch counterpart, float32 on CPU (NCHW ↔ NHWC)."""

import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from conftest import nchw, nhwc, randomize, rel_err
from diffusers.pipelines.deprecated.wuerstchen import modeling_paella_vq_model as tq
from diffusers.pipelines.deprecated.wuerstchen import modeling_wuerstchen_common as tc
from diffusers.pipelines.deprecated.wuerstchen import modeling_wuerstchen_diffnext as tb
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior

from wurst_jax.models import layers
from wurst_jax.models.wuerstchen.stage_a import MixingResidualBlock
from wurst_jax.weights.mapping import state_dict_source
from wurst_jax.weights.mapping import to_variables as convert

TOL = 1e-5
F32 = np.float32


def run_both(flax_block, torch_block, flax_inputs, torch_inputs, seed=0):
    """Randomise the torch block, convert its weights into `flax_block`'s tree and return both outputs."""
    torch_block = randomize(torch_block, seed)
    target = nn.meta.unbox(jax.eval_shape(flax_block.init, jax.random.key(0), *flax_inputs))
    variables = convert(state_dict_source(torch_block.state_dict()), target, "block")
    with torch.no_grad():
        want = torch_block(*torch_inputs)
    return flax_block.apply(variables, *flax_inputs), want


def check(got, want, tol=TOL):
    err = rel_err(got, want)
    print(f"rel_err={err:.3g}")
    assert np.shape(got) == np.shape(want)
    assert err <= tol


def test_global_response_norm(rng):
    x = rng.standard_normal((2, 5, 7, 12), F32)  # GRN works channels-last in both frameworks
    got, want = run_both(layers.GlobalResponseNorm(12), tc.GlobalResponseNorm(12), [x], [torch.from_numpy(x)])
    check(got, want.numpy())


def test_timestep_block(rng):
    x = rng.standard_normal((2, 5, 7, 12), F32)
    t = rng.standard_normal((2, 10), F32)
    got, want = run_both(layers.TimestepBlock(12), tc.TimestepBlock(12, 10), [x, t], [nchw(x), torch.from_numpy(t)])
    check(got, nhwc(want))


@pytest.mark.parametrize("c_skip", [0, 16])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_resblock_stage_c(rng, c_skip, kernel_size):
    x = rng.standard_normal((2, 6, 9, 8), F32)
    skip = rng.standard_normal((2, 6, 9, c_skip), F32) if c_skip else None
    flax_in, torch_in = ([x, skip], [nchw(x), nchw(skip)]) if c_skip else ([x], [nchw(x)])
    got, want = run_both(
        layers.ResBlock(8, c_skip, kernel_size), tc.ResBlock(8, c_skip, kernel_size), flax_in, torch_in
    )
    check(got, nhwc(want))


@pytest.mark.parametrize("c_skip", [0, 20])
def test_resblock_stage_b(rng, c_skip):
    x = rng.standard_normal((2, 6, 9, 8), F32)
    skip = rng.standard_normal((2, 6, 9, c_skip), F32) if c_skip else None
    flax_in, torch_in = ([x, skip], [nchw(x), nchw(skip)]) if c_skip else ([x], [nchw(x)])
    got, want = run_both(layers.ResBlockStageB(8, c_skip), tb.ResBlockStageB(8, c_skip), flax_in, torch_in)
    check(got, nhwc(want))


@pytest.mark.parametrize("self_attn", [True, False])
def test_attn_block(rng, self_attn):
    x = rng.standard_normal((2, 3, 5, 16), F32)  # non-square token grid
    kv = rng.standard_normal((2, 7, 12), F32)
    got, want = run_both(
        layers.AttnBlock(16, 12, 4, self_attn), tc.AttnBlock(16, 12, 4, self_attn), [x, kv], [nchw(x), torch.tensor(kv)]
    )
    check(got, nhwc(want))


def test_mixing_residual_block(rng):
    x = rng.standard_normal((2, 5, 7, 8), F32)
    got, want = run_both(MixingResidualBlock(8, 32), tq.MixingResidualBlock(8, 32), [x], [nchw(x)])
    check(got, nhwc(want))


@pytest.mark.parametrize("kernel,stride,padding", [(4, 2, 1), (2, 2, 0)])
def test_conv_transpose(rng, kernel, stride, padding):
    x = rng.standard_normal((2, 5, 7, 6), F32)
    flax_block = layers.conv_transpose(10, kernel, stride, padding, "up", np.float32, np.float32)
    torch_block = torch.nn.ConvTranspose2d(6, 10, kernel, stride, padding)
    got, want = run_both(flax_block, torch_block, [x], [nchw(x)])
    assert got.shape == (2, 10, 14, 10)
    check(got, nhwc(want))


@pytest.mark.parametrize("c_skip", [0, 8, 16])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_depthwise_conv_with_skip_channels(rng, c_skip, kernel_size):
    x = rng.standard_normal((2, 6, 9, 8 + c_skip), F32)
    pad = kernel_size // 2
    flax_block = layers.conv(8, kernel_size, "depthwise", np.float32, np.float32, padding=pad, groups=8)
    torch_block = torch.nn.Conv2d(8 + c_skip, 8, kernel_size, padding=pad, groups=8)
    got, want = run_both(flax_block, torch_block, [x], [nchw(x)])
    check(got, nhwc(want))


@pytest.mark.parametrize("r,c", [(2, 1), (2, 3), (2, 4), (3, 2), (4, 5)])
def test_pixel_shuffle_and_unshuffle_are_exact(rng, r, c):
    x = rng.standard_normal((2, 3 * r, 5 * r, c), F32)
    unshuffled = layers.pixel_unshuffle(x, r)
    np.testing.assert_array_equal(unshuffled, nhwc(torch.nn.PixelUnshuffle(r)(nchw(x))))
    y = rng.standard_normal((2, 3, 5, c * r * r), F32)
    np.testing.assert_array_equal(layers.pixel_shuffle(y, r), nhwc(torch.nn.PixelShuffle(r)(nchw(y))))
    np.testing.assert_array_equal(layers.pixel_shuffle(unshuffled, r), x)


@pytest.mark.parametrize("c_r", [64, 8, 9, 65])
def test_timestep_embedding(c_r):
    def both(r):
        want = WuerstchenPrior.gen_r_embedding(types.SimpleNamespace(c_r=c_r), torch.from_numpy(r)).numpy()
        got = np.asarray(layers.timestep_embedding(r, c_r))
        assert got.shape == want.shape == (len(r), c_r)
        return got, want

    # Small r (sin/cos arguments ≤ 50): the layout ([sin, cos], zero pad if odd) and frequencies match to 1e-5.
    check(*both(np.array([0.0, 1e-4, 1e-3, 2.5e-3, 5e-3], F32)))
    # Over the whole [0, 1] the arguments reach r·10⁴, where XLA's and torch's float32 exp differ by 1 ulp on a few
    # frequencies; the result then differs by up to one float32 spacing of r·10⁴ (≈ 1e-3 at r = 1), not 1e-5.
    r = np.linspace(0, 1, 101, dtype=F32)
    got, want = both(r)
    assert np.all(np.abs(got - want).max(axis=1) <= np.spacing(r * F32(1e4)))


def test_layer_norm(rng):
    x = (rng.standard_normal((2, 5, 7, 12)) * 3 + 1).astype(F32)
    want = tc.WuerstchenLayerNorm(12, elementwise_affine=False, eps=1e-6)(nchw(x))
    check(layers.layer_norm(x), nhwc(want))
