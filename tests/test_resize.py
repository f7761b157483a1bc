"""resize_bicubic_aa vs torch F.interpolate(mode="bicubic", antialias=True, align_corners=True)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from wurst_jax.models.resize import resize_bicubic_aa, resize_matrix  # noqa: E402

AXIS_PAIRS = [
    (24, 64), (24, 32), (24, 16), (24, 24), (18, 48), (30, 80), (18, 9), (30, 15),
    (7, 3), (5, 17), (2, 5), (1, 4), (4, 1), (64, 24), (1, 1), (3, 3), (2, 1), (1, 2), (48, 80), (100, 7),
]  # fmt: skip
CASES_2D = [
    ((24, 24), (64, 64)), ((24, 24), (32, 32)), ((24, 24), (16, 16)), ((24, 24), (24, 24)),
    ((18, 30), (48, 80)), ((18, 30), (9, 15)), ((13, 7), (5, 20)), ((64, 24), (24, 64)),
    ((7, 5), (3, 17)), ((2, 1), (5, 4)), ((4, 4), (1, 1)), ((1, 1), (4, 4)), ((1, 4), (4, 1)), ((5, 3), (5, 9)),
]  # fmt: skip
TOL = 1e-5  # max abs error relative to the input scale (max |x|)


def _interp(x, size):
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=True)


def _torch_ref(x_nchw: np.ndarray, size) -> np.ndarray:
    x = torch.from_numpy(x_nchw)
    h_in, w_in = x.shape[-2:]
    if size[1] == 1 and h_in not in (1, size[0]):
        # torch's CPU AA kernel is wrong when W_out == 1 and H is resized (every output row equals row 0).
        # The op is separable, so use torch per axis, each call only resizing the last dim (which is correct).
        x = _interp(x.transpose(2, 3), (w_in, size[0])).transpose(2, 3).contiguous()
        x = _interp(x, (size[0], size[1]))
    else:
        x = _interp(x, size)
    return x.numpy().transpose(0, 2, 3, 1)  # -> NHWC


def _check(in_hw, out_hw, seed=0, fn=resize_bicubic_aa):
    x = np.random.default_rng(seed).standard_normal((2, 3, *in_hw)).astype(np.float32)  # NCHW
    ref = _torch_ref(x, out_hw)
    out = np.asarray(fn(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw))
    assert out.shape == ref.shape == (2, *out_hw, 3)
    assert out.dtype == np.float32
    err = float(np.abs(out - ref).max() / np.abs(x).max())
    assert err <= TOL, (in_hw, out_hw, err)
    return err


def _torch_matrix(n_in: int, n_out: int, dtype=torch.float32) -> np.ndarray:
    # Resize identity rows along H. W is kept at 3: torch's CPU AA kernel is wrong when W_out == 1.
    x = torch.eye(n_in, dtype=dtype).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 3).contiguous()
    y = _interp(x, (n_out, 3))
    return y[:, 0, :, 0].T.to(torch.float64).numpy()  # [out, in]


@pytest.mark.parametrize("n_in,n_out", AXIS_PAIRS)
def test_matrix_matches_torch(n_in, n_out):
    m = resize_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in) and m.dtype == np.float32
    np.testing.assert_allclose(m, _torch_matrix(n_in, n_out), rtol=0, atol=1e-6)  # torch float32 weights
    np.testing.assert_allclose(m, _torch_matrix(n_in, n_out, torch.float64), rtol=0, atol=1e-5)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-5)
    if n_in == n_out:
        np.testing.assert_array_equal(m, np.eye(n_in, dtype=np.float32))  # torch is exactly the identity


def test_matrix_cached_and_read_only():
    m = resize_matrix(24, 64)
    assert m is resize_matrix(24, 64)
    with pytest.raises(ValueError):
        m[0, 0] = 1.0


@pytest.mark.parametrize("in_hw,out_hw", CASES_2D)
def test_resize_matches_torch_2d(in_hw, out_hw):
    _check(in_hw, out_hw)


def test_resize_matches_torch_axis_combinations():
    # Each per-axis pair on H against several per-axis pairs on W (3 rotations; the full product is slow on CPU).
    n = len(AXIS_PAIRS)
    combos = [(AXIS_PAIRS[i], AXIS_PAIRS[(i + r) % n]) for r in (0, 7, 13) for i in range(n)]
    errs = [_check((h[0], w[0]), (h[1], w[1]), seed=k) for k, (h, w) in enumerate(combos)]
    assert max(errs) <= TOL


def test_resize_jit_and_dtype():
    fn = jax.jit(resize_bicubic_aa, static_argnames="size")
    _check((18, 30), (48, 80), fn=fn)
    _check((24, 24), (16, 16), fn=fn)
    x = jnp.ones((1, 24, 24, 4), jnp.bfloat16)
    y = fn(x, size=(64, 32))
    assert y.shape == (1, 64, 32, 4) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), 1.0, atol=1e-5)  # weights are normalised
