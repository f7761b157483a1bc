"""Stable Cascade's stage C ControlNet: the model against a PyTorch re-implementation of the original
`modules/controlnet.py` (written here from its source, on torchvision's EfficientNet), the control injection in
`StableCascadeUNet` against diffusers' `StableCascadeUNet` with the original stage C's `cnet` code put into its
down / up passes, the converter and export on original-layout files, the filters against torch + OpenCV, and the
training loss (stage C frozen)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from conftest import nchw, nhwc, randomize, rel_err, torch_effnet

import wurst_jax as wj
from wurst_jax.cli import main
from wurst_jax.controlnet import filters
from wurst_jax.controlnet.training import TRAINABLE, controlnet_loss, controlnet_variables
from wurst_jax.models import registry
from wurst_jax.models.cascade import (
    ControlNetConfig,
    StableCascadeControlNet,
    StableCascadeUNet,
    StableCascadeUNetConfig,
    abstract_params,
    scale_control,
)
from wurst_jax.models.cascade.controlnet import RELEASED_BLOCKS
from wurst_jax.models.effnet import EfficientNetConfig
from wurst_jax.train.config import RunConfig
from wurst_jax.train.setup import build_train_setup
from wurst_jax.weights.mapping import state_dict_source, to_variables

R, T, A = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
TOL = 1e-4
# ResBlocks run: down level 0: 0; down level 1, two repeat-mapper passes of 2: 1, 2 | 3, 4; up level 1: 5, 6;
# up level 0: 7. Level 1 is at half resolution (switch_level), so controls are resized to two sizes.
PRIOR = StableCascadeUNetConfig(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=8,
    conditioning_dim=16,
    block_out_channels=(16, 16),
    num_attention_heads=(2, 2),
    down_num_layers_per_block=(1, 2),
    up_num_layers_per_block=(2, 1),
    down_blocks_repeat_mappers=(1, 2),
    up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=((R, T, A), (R, T, A)),
    clip_text_in_channels=12,
    clip_text_pooled_in_channels=12,
    clip_image_in_channels=10,
    clip_seq=2,
    switch_level=(True,),
)
N_RES = 8


def prior_inputs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 8, 10, 4), np.float32)
    r = np.linspace(0.8, 0.3, b).astype(np.float32)
    pooled, text = rng.standard_normal((b, 1, 12), np.float32), rng.standard_normal((b, 3, 12), np.float32)
    return x, r, pooled, text, rng.standard_normal((b, 1, 10), np.float32)


@functools.cache
def torch_prior():
    """(diffusers model with the original's cnet injection, our module, converted variables)."""
    from diffusers import StableCascadeUNet as TorchUNet
    from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock, SDCascadeResBlock

    def interp(t, size):
        return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=True)

    class CNetUNet(TorchUNet):
        """The original `StageC._down_encode` / `_up_decode`: before each ResBlock, the next `cnet` entry (if not
        None) resized to x and added; in the up pass after x was resized to the skip."""

        cnet = None

        def _next(self, x):
            c = self.cnet.pop(0) if self.cnet else None
            return x if c is None else x + interp(c, x.shape[-2:])

        def _down_encode(self, x, r_embed, clip):
            outs = []
            for blocks, down, repmap in zip(
                self.down_blocks, self.down_downscalers, self.down_repeat_mappers, strict=True
            ):
                x = down(x)
                for i in range(len(repmap) + 1):
                    for block in blocks:
                        if isinstance(block, SDCascadeResBlock):
                            x = block(self._next(x))
                        else:
                            x = block(x, clip if isinstance(block, SDCascadeAttnBlock) else r_embed)
                    if i < len(repmap):
                        x = repmap[i](x)
                outs.insert(0, x)
            return outs

        def _up_decode(self, outs, r_embed, clip):
            x = outs[0]
            levels = zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers, strict=True)
            for i, (blocks, up, repmap) in enumerate(levels):
                for j in range(len(repmap) + 1):
                    for k, block in enumerate(blocks):
                        if isinstance(block, SDCascadeResBlock):
                            skip = outs[i] if k == 0 and i > 0 else None
                            if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                                x = interp(x, skip.shape[-2:])
                            x = block(self._next(x), skip)
                        else:
                            x = block(x, clip if isinstance(block, SDCascadeAttnBlock) else r_embed)
                    if j < len(repmap):
                        x = repmap[j](x)
                x = up(x)
            return x

    listed = lambda v: [listed(x) for x in v] if isinstance(v, tuple) else v  # noqa: E731
    ref = randomize(CNetUNet(**{k: listed(v) for k, v in dataclasses.asdict(PRIOR).items()}), seed=4)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    variables = to_variables(state_dict_source(sd), {"params": abstract_params(PRIOR)}, "prior")
    return ref, StableCascadeUNet(PRIOR), variables


def random_control(sizes: dict, b=2, seed=5):
    rng = np.random.default_rng(seed)
    out = [None] * (max(sizes) + 1)
    for i, hw in sizes.items():
        out[i] = rng.standard_normal((b, *hw, 16), np.float32)
    return out


# ---------------------------------------------------------------- injection into stage C


def test_control_injection_matches_the_original_semantics():
    """Entries at ResBlocks of every level and pass, smaller, larger and equal to the level, one per sample or one
    for the batch: as the original's cnet code in diffusers' network."""
    ref, module, variables = torch_prior()
    x, r, pooled, text, img = prior_inputs()
    control = random_control({0: (3, 5), 2: (4, 5), 4: (6, 7), 5: (2, 2), 7: (8, 10)})
    control[5] = control[5][:1]  # broadcast over the batch
    ref.cnet = [None if c is None else nchw(c).expand(2, -1, -1, -1) for c in control]
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(r), torch.from_numpy(pooled), torch.from_numpy(text),
                        torch.from_numpy(img)).sample)  # fmt: skip
    assert ref.cnet == []  # every entry consumed
    apply = jax.jit(module.apply)
    got = apply(variables, x, r, pooled, text, img, control=control)
    err = rel_err(got, want)
    print(f"control injection rel err {err:.2e}")
    assert err < TOL
    plain = apply(variables, x, r, pooled, text, img)
    assert rel_err(plain, want) > 1e-2  # the control matters

    # scanned / rematerialised repeats split at the controlled ResBlocks (2 and 4 are second repeats)
    for kw in (dict(scan_blocks=True), dict(remat=True)):
        other = StableCascadeUNet(PRIOR, **kw)
        assert rel_err(jax.jit(other.apply)(variables, x, r, pooled, text, img, control=control), got) < 1e-5


def test_zero_controlnet_leaves_stage_c_bit_equal():
    _, module, variables = torch_prior()
    x, r, pooled, text, img = prior_inputs(seed=1)
    cn = StableCascadeControlNet(ControlNetConfig.tiny())
    cn_vars = cn.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)))  # the last projections are zero-initialised
    cond = np.random.default_rng(2).random((2, 64, 80, 1), np.float32)
    control = jax.jit(cn.apply)(cn_vars, cond)
    assert [c is None for c in control] == [False, True, False, False, True, False]
    assert all(c.shape == (2, 2, 3, 16) and not np.any(np.asarray(c)) for c in control if c is not None)
    # Op by op (no jit) adding the zeros is exact: bit-equal. Jitted, the two programs differ only in how XLA fuses
    # the extra add (the last bits of a few outputs; bounded below).
    with jax.disable_jit():
        plain = np.asarray(module.apply(variables, x, r, pooled, text, img))
        np.testing.assert_array_equal(
            np.asarray(module.apply(variables, x, r, pooled, text, img, control=control)), plain
        )
    apply = jax.jit(module.apply)
    jitted, jitted_plain = (np.asarray(apply(variables, x, r, pooled, text, img, control=c)) for c in (control, None))
    print(f"zero control, jitted: rel err {rel_err(jitted, jitted_plain):.2e} against the plain program")
    assert rel_err(jitted, jitted_plain) < 1e-5
    # not vacuous: the same controls made non-zero change the output; scale 0 brings it back
    nonzero = tuple(None if c is None else c + 0.5 for c in control)
    assert rel_err(apply(variables, x, r, pooled, text, img, control=nonzero), jitted) > 1e-3
    zeroed = scale_control(nonzero, 0.0)
    np.testing.assert_array_equal(np.asarray(apply(variables, x, r, pooled, text, img, control=zeroed)), jitted)


def test_bad_control_raises():
    _, module, variables = torch_prior()
    x, r, pooled, text, img = prior_inputs()
    trace = lambda control: jax.eval_shape(lambda: module.apply(variables, x, r, pooled, text, img, control=control))  # noqa: E731
    with pytest.raises(ValueError, match=r"control\[1\] must be .* 16\]"):
        trace([None, np.zeros((2, 2, 2, 8), np.float32)])
    with pytest.raises(ValueError, match=r"control entries \[9\] are past the network's 8 ResBlocks"):
        trace([None] * 9 + [np.zeros((2, 2, 2, 16), np.float32)])


# ---------------------------------------------------------------- the ControlNet and its files


def torch_backbone(cfg: ControlNetConfig) -> torch.nn.Module:
    """The original's bottleneck: torchvision's EfficientNet `features` (the stem replaced by an unpadded conv for
    c_in != 3), or the large / simple stacks."""
    nn = torch.nn
    if cfg.bottleneck_mode == "effnet":
        from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

        net, setting = EfficientNetConfig(effnet=cfg.effnet), []
        c = net.stem
        for kind, expand, kernel, stride, out, layers in net.stages:
            block = FusedMBConvConfig if kind == "fused" else MBConvConfig
            setting.append(block(expand, kernel, stride, c, out, layers))
            c = out
        bn = functools.partial(nn.BatchNorm2d, eps=1e-3)
        backbone = EfficientNet(setting, 0.0, last_channel=cfg.c_embd, norm_layer=bn).features
        if cfg.c_in != 3:
            backbone[0][0] = nn.Conv2d(cfg.c_in, net.stem, kernel_size=3, stride=2, bias=False)
        return backbone
    if cfg.bottleneck_mode == "simple":
        c = cfg.c_in
        return nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4 * c, c, 3, padding=1))

    class CNetResBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.blocks = nn.Sequential(
                LN2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), LN2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1)
            )

        def forward(self, x):
            return x + self.blocks(x)

    class LN2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return nn.Sequential(
        nn.Conv2d(cfg.c_in, cfg.large_hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(cfg.large_hidden, cfg.large_channels, 1),
        *[CNetResBlock(cfg.large_channels) for _ in range(cfg.large_blocks)],
        nn.Conv2d(cfg.large_channels, cfg.c_embd, 1),
    )  # fmt: skip


class TorchControlNet(torch.nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        nn, e = torch.nn, cfg.embd_channels
        self.proj_blocks, self.backbone = cfg.proj_blocks, torch_backbone(cfg)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(e, e, 1, bias=False), nn.LeakyReLU(0.2), nn.Conv2d(e, cfg.c_proj, 1, bias=False))
            for _ in cfg.proj_blocks
        )

    def forward(self, x):
        x = self.backbone(x)
        out = [None] * (max(self.proj_blocks) + 1)
        for i, idx in enumerate(self.proj_blocks):
            out[idx] = self.projections[i](x)
        return out


CONFIGS = {
    "effnet": ControlNetConfig.tiny(),
    "large": dataclasses.replace(ControlNetConfig.tiny_large(), proj_blocks=RELEASED_BLOCKS),
    "simple": ControlNetConfig(c_in=5, c_proj=8, proj_blocks=tuple(range(64)), bottleneck_mode="simple"),
}


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_original_file_converts_runs_like_torch_and_exports_back(mode, tmp_path):
    cfg = CONFIGS[mode]
    ref = randomize(TorchControlNet(cfg), seed=7, scale=0.3)
    original = tmp_path / f"{mode}.safetensors"
    safetensors.torch.save_file(ref.state_dict(), str(original))  # original key names, num_batches_tracked too
    keys = list(safetensors.numpy.load_file(str(original)))
    assert registry.detect(keys)[0].kind == "controlnet"

    args = ["convert", str(original), str(tmp_path / "conv"), "--stage", "controlnet", "--quiet"]
    if mode == "effnet":  # 4 projections: which ResBlocks they feed is not in the file
        assert main(args) == 2
        args += ["--config", json.dumps({"c_in": 1, "c_proj": 16, "proj_blocks": [0, 2, 3, 5], "effnet": "tiny",
                                         "c_embd": 48})]  # fmt: skip
    assert main(args) == 0
    module, variables = wj.load_component(tmp_path / "conv")
    assert isinstance(module, StableCascadeControlNet) and module.config == cfg

    x = np.random.default_rng(3).random((2, 64, 96, cfg.c_in), np.float32)
    with torch.no_grad():
        want = ref(nchw(x))
    got = jax.jit(module.apply)(variables, x)
    assert [g is None for g in got] == [w is None for w in want]
    err = max(rel_err(g, nhwc(w)) for g, w in zip(got, want, strict=True) if w is not None)
    print(f"{mode} ControlNet rel err {err:.2e}")
    assert err < 1e-5

    exported = wj.export_component(module, variables, tmp_path / "exported")
    back = safetensors.numpy.load_file(str(exported / "diffusion_pytorch_model.safetensors"))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(back) == set(sd)  # BatchNorm's num_batches_tracked written as torch has it
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_stage_names_refuse_the_other_kind(tmp_path):
    ref = TorchControlNet(CONFIGS["large"])
    path = tmp_path / "sr.safetensors"
    safetensors.torch.save_file(ref.state_dict(), str(path))
    assert main(["convert", str(path), str(tmp_path / "out"), "--stage", "effnet", "--quiet"]) == 2


@pytest.mark.parametrize("preset", ["canny", "inpainting", "sr"])
def test_released_layouts_read_back_as_the_presets(preset):
    """The full-size original module (on the meta device: nothing allocated) has exactly our tensor names and
    shapes, and its shapes give back the preset's config."""
    from wurst_jax.models import abstract_variables
    from wurst_jax.weights.export import torch_tensors

    cfg = getattr(ControlNetConfig, preset)()
    with torch.device("meta"):
        ref = TorchControlNet(cfg)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert registry.detect(list(shapes))[0].kind == "controlnet"
    assert registry.get("controlnet").single_file_config(shapes) == cfg
    module = StableCascadeControlNet(cfg)
    assert {key: shape for key, shape, _, _ in torch_tensors(module, abstract_variables(module))} == shapes


# ---------------------------------------------------------------- filters


def test_canny_equals_torch_resize_and_cv2():
    import cv2

    h, w = 181, 257
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [np.sin(xx / 9) * 0.3 + 0.5, ((xx // 40 + yy // 30) % 2) * 0.8 + 0.1, (xx > yy) * 0.6 + 0.2], -1
    ).astype(np.float32)
    img = np.clip(img + np.random.default_rng(0).random(img.shape, np.float32) * 0.1, 0, 1)
    t = torch.from_numpy(img.transpose(2, 0, 1)[None].copy())
    small = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear")
    edges = cv2.Canny(small[0].mul(255).permute(1, 2, 0).numpy().astype(np.uint8), 100, 200)
    want = torch.nn.functional.interpolate(torch.tensor(edges).div(255)[None, None], size=(h, w), mode="bilinear")
    got = filters.canny(img[None])
    assert got.shape == (1, h, w, 1) and 0.02 < edges.mean() / 255 < 0.5
    np.testing.assert_array_equal(got[0, ..., 0], want[0, 0].numpy())
    # uint8 input is read as ToTensor reads it
    u8 = (img * 255).astype(np.uint8)
    np.testing.assert_array_equal(filters.canny(u8), filters.canny(u8.astype(np.float32) / 255))


def test_inpaint_and_outpaint_conditions_and_composite(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.random((1, 32, 48, 3), np.float32)
    mask = np.zeros((32, 48), bool)
    mask[8:20, 10:30] = True
    Image.fromarray(mask.astype(np.uint8) * 255).resize((96, 64), Image.NEAREST).save(tmp_path / "mask.png")
    loaded = filters.load_mask(tmp_path / "mask.png", (32, 48))
    np.testing.assert_array_equal(loaded[0], mask)
    cond = filters.inpaint(img, loaded)
    assert cond.shape == (1, 32, 48, 4)
    np.testing.assert_array_equal(cond[0, ..., 3], mask.astype(np.float32))
    assert np.all(cond[0][mask][:, :3] == 1) and np.array_equal(cond[0][~mask][:, :3], img[0][~mask])

    out = filters.outpaint_mask((32, 48), (8, 4, 40, 28))
    assert out.sum() == 32 * 48 - 24 * 32 and not out[0, 4:28, 8:40].any()
    generated = rng.random((1, 32, 48, 3), np.float32)
    kept = filters.composite(img, generated, out)
    np.testing.assert_array_equal(kept[0][~out[0]], img[0][~out[0]])
    np.testing.assert_array_equal(kept[0][out[0]], generated[0][out[0]])
    with pytest.raises(ValueError, match="outpainting box"):
        filters.outpaint_mask((32, 48), (8, 4, 60, 28))
    with pytest.raises(ValueError, match="mask must be"):
        filters.inpaint(img, np.zeros((16, 48), bool))


def test_super_resolution_filter_matches_the_original(tmp_path):
    for n in (7, 8, 33):  # nearest indices as torch's, down by ½ and up by 2
        x = torch.arange(n, dtype=torch.float32)[None, None]
        for scale in (0.5, 2.0):
            want = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")[0, 0].numpy()
            np.testing.assert_array_equal(filters.nearest_indices(n, scale), want.astype(np.int64))
    ref = torch_effnet(EfficientNetConfig(c_latent=16, c_cond=48, effnet="tiny", mapper_affine=False), seed=3)
    ref.save_pretrained(tmp_path / "effnet")
    effnet, variables = wj.load_component(tmp_path / "effnet")
    img = np.random.default_rng(1).random((2, 128, 192, 3), np.float32)
    cond, preview = filters.super_resolution(effnet, variables, img)
    t = torch.nn.functional.interpolate(nchw(img), scale_factor=0.5, mode="nearest")
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        emb = torch.nn.functional.interpolate(ref((t - mean) / std), scale_factor=2.0, mode="nearest")
    assert cond.shape == (2, 4, 6, 16) and rel_err(cond, nhwc(emb)) < 1e-5
    np.testing.assert_array_equal(preview, nhwc(torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")))


# ---------------------------------------------------------------- training


def test_training_steps_lower_the_loss_and_leave_stage_c_bit_equal():
    _, unet, unet_vars = torch_prior()
    cn = StableCascadeControlNet(ControlNetConfig.tiny())
    cn_vars = cn.init(jax.random.key(1), jnp.zeros((1, 64, 64, 1)))
    rng = np.random.default_rng(0)
    x, _, pooled, text, img = prior_inputs(b=4, seed=2)
    batch = {"latents": x, "condition": rng.random((4, 64, 80, 1), np.float32), "clip_text": text,
             "clip_text_pooled": pooled, "clip_img": img}  # fmt: skip
    loss_fn = controlnet_loss(unet, cn, offset_noise=0.1, empty_text=(text[:1] * 0, pooled[:1] * 0))
    variables = controlnet_variables(unet_vars["params"], cn_vars)
    assert set(variables["batch_stats"]) == {"controlnet"}
    setup = build_train_setup(loss_fn, variables, RunConfig(lr=2e-2, warmup_steps=1), trainable=TRAINABLE)
    assert set(setup.state.params) == {"controlnet"} and set(setup.state.frozen) == {"stage_c"}

    # an over-fitting check: every step draws the same t, noise and dropout (the state's key reset), so the loss
    # on that draw must fall
    key = np.asarray(setup.state.rng)  # a host copy: the step donates the state
    step_key = jax.random.split(key)[1]  # what the train step hands the loss
    eval_loss = jax.jit(lambda p: loss_fn({"controlnet": p, "stage_c": unet_vars["params"]},
                                          variables["batch_stats"], step_key, batch)[0])  # fmt: skip
    before = float(eval_loss(setup.state.params["controlnet"]))
    state, losses = setup.state, []
    for _ in range(6):  # the first step has lr 0 (warm-up from 0)
        state, metrics = setup.step(state.replace(rng=jnp.asarray(key)), batch)
        losses.append(float(metrics["loss"]))
    after = float(eval_loss(state.params["controlnet"]))
    print(f"controlnet training: loss {before:.4f} -> {after:.4f}, step losses {losses}")
    assert losses[0] == pytest.approx(before, rel=1e-4)
    assert np.all(np.isfinite(losses)) and after < 0.9 * before
    flat = jax.tree_util.tree_leaves_with_path(state.frozen["stage_c"])
    want = dict(jax.tree_util.tree_leaves_with_path(unet_vars["params"]))
    assert len(flat) == len(want)
    for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- in a sampling loop


def test_control_made_once_scaled_and_repeated_for_cfg():
    from wurst_jax.controlnet.stage_c import compute_control, controlled_prior_model, make_condition

    _, module, variables = torch_prior()
    x, r, pooled, text, img = prior_inputs()
    cn = StableCascadeControlNet(ControlNetConfig.tiny())
    cn_vars = cn.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
    cn_vars = jax.tree_util.tree_map(lambda v: v + 0.05, cn_vars)  # non-zero projections
    yy, xx = np.mgrid[0:64, 0:80]
    image = np.repeat(((xx // 16 + yy // 16) % 2).astype(np.float32)[None, ..., None], 3, axis=-1)
    cond = make_condition("canny", image)
    assert cond.shape == (1, 64, 80, 1) and cond.max() > 0
    control = compute_control(cn, cn_vars, cond, scale=0.5, copies=2)
    single = compute_control(cn, cn_vars, cond)
    for c, s in zip(control, single, strict=True):
        assert (c is None) == (s is None)
        if c is not None:
            assert c.shape == (2, 2, 3, 16)
            np.testing.assert_array_equal(c, np.concatenate([s, s]) * np.float32(0.5))
    model = jax.jit(controlled_prior_model, static_argnums=0)
    conds = {"pooled": pooled, "text": text, "image": img}
    got = model(module, variables, x, r, conds | {"control": control})
    # passed through (that a non-zero control changes stage C's output is checked above)
    np.testing.assert_array_equal(got, jax.jit(module.apply)(variables, x, r, pooled, text, img, control=control))
    with pytest.raises(ValueError, match="needs a mask"):
        make_condition("inpaint", image)
    with pytest.raises(ValueError, match="one of"):
        make_condition("depth", image)


def test_dtypes_and_bf16_compute():
    """Parameters stored in param_dtype, BatchNorm running statistics in f32 (as `models/effnet.py`), math in
    dtype, LayerNorm / BatchNorm computed in f32."""
    for cfg in (ControlNetConfig.tiny(), ControlNetConfig.tiny_large()):
        module = StableCascadeControlNet(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        shapes = jax.eval_shape(lambda m=module, c=cfg: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, c.c_in))))
        assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes["params"])} == {jnp.dtype(jnp.bfloat16)}
        stats = jax.tree_util.tree_leaves(shapes.get("batch_stats", {}))
        assert bool(stats) == (cfg.bottleneck_mode == "effnet") and all(v.dtype == jnp.float32 for v in stats)
    module32 = StableCascadeControlNet(ControlNetConfig.tiny_large())
    variables = jax.tree_util.tree_map(lambda v: v + 0.05, module32.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4))))
    x = np.random.default_rng(0).random((1, 8, 8, 4), np.float32)
    got32 = module32.apply(variables, x)
    module16 = StableCascadeControlNet(ControlNetConfig.tiny_large(), dtype=jnp.bfloat16)
    got16 = module16.apply(variables, x)
    for a, b in zip(got16, got32, strict=True):
        if a is not None:
            assert a.dtype == jnp.bfloat16 and rel_err(a, b) < 0.03
