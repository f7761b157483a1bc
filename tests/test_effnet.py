"""The EfficientNet semantic encoder against torchvision's EfficientNetV2 (as diffusers' Würstchen training example
wraps it): random weights → save_pretrained / torch.save / safetensors → load_component or convert → same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import import_torchvision, nchw, nhwc, rel_err, torch_effnet
from safetensors.torch import save_file

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.models import param_count

TOL = 1e-5
V2S = wj.EfficientNetConfig.v2()


@pytest.fixture(scope="module")
def v2s():
    """Full-size EfficientNetV2-S encoders with random BatchNorm statistics: (affine mapper, non-affine mapper)."""
    return torch_effnet(V2S, seed=1), torch_effnet(wj.EfficientNetConfig(mapper_affine=False), seed=2)


def outputs(ref, module, variables, rng, shape=(2, 64, 96, 3)):
    """(torch, ours) on the same normalised images (non-square, so H and W cannot be swapped unnoticed)."""
    x = rng.standard_normal(shape, np.float32)
    with torch.no_grad():
        want = nhwc(ref(nchw(x)))
    return want, np.asarray(jax.jit(module.apply)(variables, x))


@pytest.mark.parametrize("name", ["efficientnet_v2_s", "efficientnet_v2_l"])
def test_parameter_count_equals_torchvision(name):
    tv = import_torchvision()
    backbone = getattr(tv.models, name)().features
    mapper = 1280 * 16 + 2 * 16  # 1×1 conv without bias, BatchNorm weight and bias
    want = sum(p.numel() for p in backbone.parameters()) + mapper
    assert param_count(wj.EfficientNetEncoder(wj.EfficientNetConfig(effnet=name))) == want


def test_tiny_encoder_matches_torchvision(tmp_path, rng):
    ref = torch_effnet()  # torchvision's EfficientNet class on the tiny stage table: every block kind, SE, strides
    ref.save_pretrained(tmp_path / "effnet")
    module, variables = wj.load_component(tmp_path / "effnet")
    assert isinstance(module, wj.EfficientNetEncoder) and module.config == wj.EfficientNetConfig.tiny()
    assert set(variables) == {"params", "batch_stats"}
    want, got = outputs(ref, module, variables, rng)
    assert got.shape == (2, 2, 3, 4) and rel_err(got, want) < TOL


def test_v2s_encoder_matches_torchvision_and_exports_back(v2s, tmp_path, rng):
    ref = v2s[0]
    ref.save_pretrained(tmp_path / "effnet")
    module, variables = wj.load_component(tmp_path / "effnet")
    assert module.config == V2S
    want, got = outputs(ref, module, variables, rng)
    assert got.shape == (2, 2, 3, 16) and rel_err(got, want) < TOL

    # bf16 compute (f32 weights, f32 BatchNorm): close to f32 and finite
    module16, variables16 = wj.load_component(tmp_path / "effnet", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    _, got16 = outputs(ref, module16, variables16, np.random.default_rng(0))
    _, got32 = outputs(ref, module, variables, np.random.default_rng(0))
    assert np.all(np.isfinite(got16)) and rel_err(got16, got32) < 0.02

    # back to PyTorch: the reference class loads the export with strict key checking
    wj.export_component(module, variables, tmp_path / "exported")
    back = type(ref).from_pretrained(tmp_path / "exported").eval()
    x = torch.from_numpy(rng.standard_normal((1, 3, 32, 32), np.float32))
    with torch.no_grad():
        assert torch.equal(back(x), ref(x))


def test_convert_from_stage_b_checkpoint_and_stable_cascade_file(v2s, tmp_path, rng, capsys):
    affine, plain = v2s
    # Würstchen v2's model_v2_stage_b.pt: the decoder under state_dict, the encoder under effnet_state_dict
    pt = tmp_path / "model_v2_stage_b.pt"
    torch.save({"state_dict": {"clip_mapper.weight": torch.zeros(2, 2)}, "effnet_state_dict": affine.state_dict()}, pt)
    assert main(["convert", str(pt), str(tmp_path / "a"), "--stage", "effnet", "--quiet"]) == 0
    # Stable Cascade's effnet_encoder.safetensors: the encoder alone, its mapper BatchNorm without weight and bias
    st = tmp_path / "effnet_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, st)
    assert main(["convert", str(st), str(tmp_path / "b"), "--stage", "effnet", "--quiet"]) == 0
    for ref, folder, cfg in ((affine, "a", V2S), (plain, "b", wj.EfficientNetConfig(mapper_affine=False))):
        module, variables = wj.load_component(tmp_path / folder)
        assert module.config == cfg  # variant and mapper read off the tensor names
        want, got = outputs(ref, module, variables, rng, (1, 32, 64, 3))
        assert rel_err(got, want) < TOL

    # the same .pt as a decoder: its state_dict entry is taken, and its tensors say so
    capsys.readouterr()
    assert main(["convert", str(pt), str(tmp_path / "c"), "--stage", "prior"]) == 2
    assert "its tensors are a decoder checkpoint's" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_effnet_config_is_checked():
    with pytest.raises(ValueError, match="effnet must be one of"):
        wj.EfficientNetConfig(effnet="resnet50")
