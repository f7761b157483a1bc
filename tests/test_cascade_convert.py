"""Converting Stable Cascade checkpoints: the original single files of Stability-AI/StableCascade (stage C / stage B,
full or lite, f32 or bf16), diffusers folders with `.bf16` variants (single and sharded), and export back to a
folder diffusers' `StableCascadeUNet.from_pretrained` loads.

The original-layout files are built here, independently of the converter: `original_model` rebuilds the key
structure of the original `StageC` / `StageB` constructors (modules/stage_c.py, stage_b.py, common.py: ModuleLists,
`nn.MultiheadAttention`, `UpDownBlock2d`, `clip_mapper`) as torch modules, and `to_original` moves a diffusers
state dict onto those names (q, k, v fused into `in_proj`); the test checks both name sets agree tensor by tensor.
"""

import copy
import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import nchw, nhwc, randomize, rel_err
from torch import nn

import wurst_jax as wj
from wurst_jax.cli.convert import main as convert_main
from wurst_jax.models import registry
from wurst_jax.models.cascade import StableCascadeUNetConfig
from wurst_jax.models.cascade.config import ATTN, RES, TIMESTEP
from wurst_jax.weights.errors import WeightsError
from wurst_jax.weights.sources import read_config

# tiny_prior has the original StageC's scalers (1×1 convs, switch_level (False,)), tiny_decoder the original StageB's
# (strided conv / transposed conv): the original modules have no switch between the two
ROLES = {
    "prior": ("stage_c", StableCascadeUNetConfig.tiny_prior()),
    "decoder": ("stage_b", StableCascadeUNetConfig.tiny_decoder()),
}
TOL = 1e-4


def torch_config(cfg: StableCascadeUNetConfig) -> dict:
    listed = lambda v: [listed(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
    return {k: listed(v) for k, v in dataclasses.asdict(cfg).items()}


# ---------------------------------------------------------------- the original modules' key structure


# parameter-free layers (LayerNorm2d without affine, PixelShuffle) are Identity placeholders: only the indices count
def _res(c, c_skip, k):
    m = nn.Module()
    m.depthwise = nn.Conv2d(c, c, k, padding=k // 2, groups=c)
    grn = nn.Module()
    grn.gamma, grn.beta = nn.Parameter(torch.zeros(1, 1, 1, 4 * c)), nn.Parameter(torch.zeros(1, 1, 1, 4 * c))
    m.channelwise = nn.Sequential(nn.Linear(c + c_skip, 4 * c), nn.GELU(), grn, nn.Dropout(), nn.Linear(4 * c, c))
    return m


def _timestep(c, c_r, conds):
    m = nn.Module()
    m.mapper = nn.Linear(c_r, 2 * c)
    for name in conds:
        setattr(m, f"mapper_{name}", nn.Linear(c_r, 2 * c))
    return m


def _attn(c, c_cond, nhead):
    m = nn.Module()
    m.attention = nn.Module()
    m.attention.attn = nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)
    m.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))
    return m


def _updown(c_in, c_out, mode):
    m = nn.Module()
    conv = nn.Conv2d(c_in, c_out, 1)
    m.blocks = nn.ModuleList([nn.Identity(), conv] if mode == "up" else [conv, nn.Identity()])
    return m


def original_model(cfg: StableCascadeUNetConfig, stage: str) -> nn.Module:
    """A torch module with the parameter names and shapes of the original StageC / StageB at `cfg`."""
    m, ch, cc = nn.Module(), cfg.block_out_channels, cfg.conditioning_dim
    p2 = cfg.patch_size**2
    if stage == "stage_c":
        m.clip_txt_mapper = nn.Linear(cfg.clip_text_in_channels, cc)
        m.clip_txt_pooled_mapper = nn.Linear(cfg.clip_text_pooled_in_channels, cc * cfg.clip_seq)
        m.clip_img_mapper = nn.Linear(cfg.clip_image_in_channels, cc * cfg.clip_seq)
    else:
        m.effnet_mapper = nn.Sequential(
            nn.Conv2d(cfg.effnet_in_channels, 4 * ch[0], 1), nn.GELU(), nn.Conv2d(4 * ch[0], ch[0], 1)
        )
        m.pixels_mapper = nn.Sequential(
            nn.Conv2d(cfg.pixel_mapper_in_channels, 4 * ch[0], 1), nn.GELU(), nn.Conv2d(4 * ch[0], ch[0], 1)
        )
        m.clip_mapper = nn.Linear(cfg.clip_text_pooled_in_channels, cc * cfg.clip_seq)
    m.embedding = nn.Sequential(nn.PixelUnshuffle(cfg.patch_size), nn.Conv2d(cfg.in_channels * p2, ch[0], 1))

    letters = {RES: "C", TIMESTEP: "T", ATTN: "A"}
    conds = cfg.timestep_conditioning_type

    def block(letter, i, c_skip=0):
        if letter == "C":
            return _res(ch[i], c_skip, cfg.kernel_size)
        if letter == "T":
            return _timestep(ch[i], cfg.timestep_ratio_embedding_dim, conds)
        return _attn(ch[i], cc, cfg.num_attention_heads[i])

    def scaler(i, mode):
        c_in, c_out = (ch[i - 1], ch[i]) if mode == "down" else (ch[i], ch[i - 1])
        if stage == "stage_c":
            return nn.Sequential(nn.Identity(), _updown(c_in, c_out, mode))
        conv = nn.Conv2d(c_in, c_out, 2, stride=2) if mode == "down" else nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        return nn.Sequential(nn.Identity(), conv)

    n = len(ch)
    m.down_blocks, m.down_downscalers, m.down_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    for i in range(n):
        m.down_downscalers.append(scaler(i, "down") if i > 0 else nn.Identity())
        types = [letters[t] for t in cfg.block_types_per_layer[i]]
        m.down_blocks.append(
            nn.ModuleList([block(t, i) for _ in range(cfg.down_num_layers_per_block[i]) for t in types])
        )
        reps = cfg.down_blocks_repeat_mappers[i] - 1
        m.down_repeat_mappers.append(nn.ModuleList([nn.Conv2d(ch[i], ch[i], 1) for _ in range(reps)]))
    m.up_blocks, m.up_upscalers, m.up_repeat_mappers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    for i in reversed(range(n)):
        m.up_upscalers.append(scaler(i, "up") if i > 0 else nn.Identity())
        types = [letters[t] for t in cfg.block_types_per_layer[i]]
        up = nn.ModuleList()
        for j in range(cfg.up_num_layers_per_block[::-1][i]):
            for k, t in enumerate(types):
                up.append(block(t, i, ch[i] if i < n - 1 and j == k == 0 else 0))
        m.up_blocks.append(up)
        reps = cfg.up_blocks_repeat_mappers[::-1][i] - 1
        m.up_repeat_mappers.append(nn.ModuleList([nn.Conv2d(ch[i], ch[i], 1) for _ in range(reps)]))
    m.clf = nn.Sequential(nn.Identity(), nn.Conv2d(ch[0], cfg.out_channels * p2, 1))
    return m


def to_original(sd: dict, stage: str, cat=np.concatenate) -> dict:
    """A diffusers StableCascadeUNet state dict under the original names (the test's own mapping); `cat` fuses
    q, k, v along dim 0 (arrays, or shapes)."""
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [sd[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"]
            out[key.replace(".attention.to_q.", ".attention.attn.in_proj_")] = cat(parts)
        elif ".attention.to_out.0." in key:
            out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = value
        elif stage == "stage_b" and key.startswith("clip_txt_pooled_mapper."):
            out["clip_mapper." + key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per role: the torch reference, its diffusers folder and its original-layout file (f32 and bf16)."""
    from diffusers import StableCascadeUNet as TorchUNet

    root = tmp_path_factory.mktemp("cascade_convert")
    out = {}
    for role, (stage, cfg) in ROLES.items():
        ref = randomize(TorchUNet(**torch_config(cfg)), seed=3 if role == "prior" else 4)
        folder = root / role
        ref.save_pretrained(folder)
        sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        original = to_original(sd, stage)
        f32 = root / f"{stage}.safetensors"
        safetensors.numpy.save_file(original, str(f32))
        bf16 = root / f"{stage}_bf16.safetensors"
        safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in original.items()}, str(bf16))
        out[role] = dict(stage=stage, cfg=cfg, ref=ref, folder=folder, original=original, f32=f32, bf16=bf16, sd=sd)
    return out


def inputs(role: str, cfg: StableCascadeUNetConfig) -> dict:
    rng = np.random.default_rng(7)
    r = np.array([0.3, 0.8], np.float32)
    pooled = rng.standard_normal((2, 1, cfg.clip_text_pooled_in_channels), np.float32)
    if role == "prior":
        return dict(
            sample=rng.standard_normal((2, 6, 5, cfg.in_channels), np.float32),
            timestep_ratio=r,
            clip_text_pooled=pooled,
            clip_text=rng.standard_normal((2, 5, cfg.clip_text_in_channels), np.float32),
            clip_img=rng.standard_normal((2, 1, cfg.clip_image_in_channels), np.float32),
        )
    return dict(
        sample=rng.standard_normal((2, 16, 24, cfg.in_channels), np.float32),
        timestep_ratio=r,
        clip_text_pooled=pooled,
        effnet=rng.standard_normal((2, 3, 4, cfg.effnet_in_channels), np.float32),
        pixels=rng.random((2, 8, 8, 3), dtype=np.float32),
    )


def torch_out(ref, kw: dict) -> np.ndarray:
    spatial = ("sample", "effnet", "pixels")
    args = {k: nchw(v) if k in spatial else torch.from_numpy(v) for k, v in kw.items()}
    with torch.no_grad():
        return nhwc(ref(**args).sample)


def assert_same_variables(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("role", ["prior", "decoder"])
def test_original_file_converts_to_the_diffusers_weights_and_outputs(made, role, tmp_path):
    m = made[role]
    reconstructed = original_model(m["cfg"], m["stage"]).state_dict()
    assert {k: tuple(v.shape) for k, v in reconstructed.items()} == {k: v.shape for k, v in m["original"].items()}

    code = convert_main(
        [str(m["f32"]), str(tmp_path / "out"), "--stage", m["stage"], "--config", str(m["folder"] / "config.json")]
    )
    assert code == 0
    module, converted = wj.load_component(tmp_path / "out")
    _, from_folder = wj.load_component(m["folder"])
    assert module.config == m["cfg"]
    assert_same_variables(converted, from_folder)

    kw = inputs(role, m["cfg"])
    ours = np.asarray(module.apply(converted, **{k: jnp.asarray(v) for k, v in kw.items()}))
    err = rel_err(ours, torch_out(m["ref"], kw))
    print(f"{role}: original file → converted, relative error vs diffusers {err:.2e}")
    assert err < TOL, err


def test_bf16_original_files_and_bf16_variant_folders(made, tmp_path):
    m = made["decoder"]
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in m["sd"].items()}
    _, from_f32 = wj.load_component(m["folder"], dtype=jnp.bfloat16)

    single = wj.convert_checkpoint(
        m["bf16"], tmp_path / "single", stage="stage_b", config=str(m["folder"] / "config.json")
    )
    assert_same_variables(wj.load_component(single, dtype=jnp.bfloat16)[1], from_f32)

    variant = tmp_path / "variant"
    (variant / "decoder").mkdir(parents=True)
    (variant / "decoder" / "config.json").write_text((m["folder"] / "config.json").read_text())
    safetensors.numpy.save_file(want, str(variant / "decoder" / "diffusion_pytorch_model.bf16.safetensors"))
    copy.deepcopy(m["ref"]).to(torch.bfloat16).save_pretrained(
        tmp_path / "sharded", variant="bf16", max_shard_size="20KB"
    )
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.bf16.json").is_file()
    for folder in (variant / "decoder", tmp_path / "sharded"):
        _, got = wj.load_component(folder, dtype=jnp.bfloat16, variant="bf16")
        assert_same_variables(got, from_f32)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bf16\.safetensors.*another --variant"):
        wj.load_component(variant / "decoder")

    assert convert_main([str(variant), str(tmp_path / "converted"), "--variant", "bf16", "--quiet"]) == 0
    assert_same_variables(wj.load_component(tmp_path / "converted" / "decoder", dtype=jnp.bfloat16)[1], from_f32)


@pytest.mark.parametrize("role", ["prior", "decoder"])
def test_export_loads_in_diffusers_with_equal_outputs(made, role, tmp_path):
    from diffusers import StableCascadeUNet as TorchUNet

    m = made[role]
    module, variables = wj.load_component(m["folder"])
    back = TorchUNet.from_pretrained(wj.export_component(module, variables, tmp_path / "exported")).eval()
    got = back.state_dict()
    assert set(got) == set(m["sd"])
    for k, v in m["sd"].items():
        np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
    kw = inputs(role, m["cfg"])
    np.testing.assert_array_equal(torch_out(back, kw), torch_out(m["ref"], kw))


PRESETS = {"stage_c": "stage_c", "stage_c_lite": "stage_c", "stage_b": "stage_b", "stage_b_lite": "stage_b"}


@pytest.mark.parametrize("preset", PRESETS)
def test_detection_reads_kind_stage_and_preset_off_the_shapes(preset, tmp_path):
    """Full-size original names and shapes (diffusers' class on the meta device, renamed): kind, stage, preset; and
    diffusers' config.json of the same model reads as the preset."""
    from diffusers import StableCascadeUNet as TorchUNet

    cfg, stage = getattr(StableCascadeUNetConfig, preset)(), PRESETS[preset]
    with torch.device("meta"):
        model = TorchUNet(**torch_config(cfg))
    model.save_config(tmp_path)  # the config.json of the hub's prior/, prior_lite/, decoder/, decoder_lite/
    assert read_config(tmp_path) == ("cascade_unet", cfg)
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    original = to_original(shapes, stage, cat=lambda parts: (sum(p[0] for p in parts), *parts[0][1:]))
    for names in (original, shapes):  # the original file and the diffusers folder alike
        spec, _ = registry.detect(list(names))
        assert spec.kind == "cascade_unet"
        assert spec.stage_of(names) == stage
        assert spec.infer_config(names) == cfg


def test_v2_checkpoints_are_not_taken_for_stable_cascade():
    from wurst_jax.models import abstract_variables
    from wurst_jax.weights.export import torch_tensors

    for kind in ("prior", "decoder"):
        spec = registry.get(kind)
        module = spec.build(spec.config.tiny())
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(module))
        names = [t[0] for t in torch_tensors(module, zeros)]
        for layout in (names, [k.replace("to_q.weight", "attn.in_proj_weight") for k in names]):  # diffusers, original
            assert registry.detect(layout)[0].kind == kind


def test_bad_inputs_give_one_line_errors(made, tmp_path, capsys):
    c, b = made["prior"], made["decoder"]
    cases = [
        ([str(b["f32"]), "--stage", "stage_c"], "--stage stage_c, but its tensors are a stage_b checkpoint's"),
        ([str(c["f32"]), "--stage", "prior"], "--stage prior, but its tensors are a cascade_unet checkpoint's"),
        ([str(c["f32"]), "--stage", "stage_c"], r"level widths \(16, 24\), which no released model has.*--config"),
        ([str(c["f32"])], "pass --stage .its tensors look like a cascade_unet"),
        ([str(c["folder"]), "--variant", "fp16"], "diffusion_pytorch_model.fp16.safetensors"),
    ]
    for i, (args, pattern) in enumerate(cases):
        assert convert_main([args[0], str(tmp_path / f"out{i}"), *args[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err

    broken = dict(c["original"])
    del broken["clip_img_mapper.weight"]
    broken["down_blocks.1.2.attention.attn.in_proj_weight"] = broken["down_blocks.1.2.attention.attn.in_proj_weight"][
        :3
    ]
    broken["clf.1.weight"] = np.full_like(broken["clf.1.weight"], np.nan)
    safetensors.numpy.save_file(broken, str(tmp_path / "broken.safetensors"))
    config = str(c["folder"] / "config.json")
    with pytest.raises(WeightsError) as e:
        wj.convert_checkpoint(tmp_path / "broken.safetensors", tmp_path / "x", stage="stage_c", config=config)
    msg = str(e.value)  # every problem in one error: the missing mapper, the three parts of the short in_proj
    assert "missing (1):\n    params/clip_img_mapper/kernel" in msg, msg
    assert msg.count("down_blocks.1.2.attention.to_") == 3, msg
    nan = dict(c["original"], **{"clf.1.weight": broken["clf.1.weight"]})
    safetensors.numpy.save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightsError, match=r"clf\.1\.weight.*NaN/Inf"):
        wj.convert_checkpoint(tmp_path / "nan.safetensors", tmp_path / "y", stage="stage_c", config=config)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
