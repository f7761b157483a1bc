"""Weight conversion: original-repo names, wrapped / half-precision state dicts, and every bad input → WeightsError."""

import json
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import torch_clip, torch_decoder, torch_prior, torch_vqgan
from safetensors.torch import save_file

import wurst_jax as wj
from wurst_jax.models import abstract_variables, example_inputs

WEIGHTS = "diffusion_pytorch_model.safetensors"

# component → (PyTorch reference, our module with the same tiny config)
COMPONENTS = {
    "prior": (torch_prior, lambda: wj.WuerstchenPrior(wj.StageCConfig.tiny())),
    "decoder": (torch_decoder, lambda: wj.WuerstchenDiffNeXt(wj.StageBConfig.tiny())),
    "vqgan": (torch_vqgan, lambda: wj.PaellaVQModel(wj.StageAConfig.tiny())),
}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def to_original_names(sd: dict) -> dict:
    """Rewrite a diffusers state dict into the original Würstchen repo's names.

    `<p>.to_q/to_k/to_v.{weight,bias}` → `<p>.attn.in_proj_{weight,bias}` (q, k, v stacked on dim 0),
    `<p>.to_out.0.*` → `<p>.attn.out_proj.*`, `vquantizer.embedding.weight` → `vquantizer.codebook.weight`.
    """
    out, qkv = {}, {}
    for key, value in sd.items():
        if m := re.fullmatch(r"(.*)\.to_([qkv])\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"(.*)\.to_out\.0\.(weight|bias)", key):
            out[f"{m[1]}.attn.out_proj.{m[2]}"] = value
        elif key == "vquantizer.embedding.weight":
            out["vquantizer.codebook.weight"] = value
        else:
            out[key] = value
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def assert_same_tree(a, b):
    """Same structure, dtypes and values, bit for bit."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def random_inputs(module, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s.shape).astype(s.dtype) for s in example_inputs(module)]


def flax_path(torch_key: str) -> str:
    """How a missing diffusers key is spelled in the error (`blocks.2.x.weight` → `params/blocks_2/x/kernel`)."""
    path = re.sub(r"\.(\d+)(?=\.)", r"_\1", torch_key).split(".")
    return "/".join(["params", *path[:-1], {"weight": "kernel"}.get(path[-1], path[-1])])


def save_component(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


@pytest.fixture(scope="module", params=list(COMPONENTS))
def component(request):
    """(name, diffusers state dict, module, variables converted from the diffusers names)."""
    make_ref, make_module = COMPONENTS[request.param]
    sd = make_ref().state_dict()
    module = make_module()
    return request.param, sd, module, wj.convert_state_dict(sd, module)


@pytest.fixture
def prior_folder(tmp_path):
    return save_component(torch_prior(), tmp_path / "prior")


# ---------------------------------------------------------------------------------------------------------------
# 1) other spellings of the same weights


def test_original_names_helper_really_renames(component):
    name, sd, _, _ = component
    original = to_original_names(sd)
    assert not any(".to_q." in k or ".to_out." in k or "vquantizer.embedding" in k for k in original)
    if name == "vqgan":
        assert "vquantizer.codebook.weight" in original
    else:
        in_proj = [k for k in original if k.endswith("attention.attn.in_proj_weight")]
        assert in_proj
        c = original[in_proj[0].replace("in_proj_weight", "out_proj.weight")].shape[0]
        assert original[in_proj[0]].shape == (3 * c, c)
        assert original[in_proj[0].replace("weight", "bias")].shape == (3 * c,)


@pytest.mark.parametrize(
    "rewrite",
    [
        to_original_names,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {f"module.{k}": v for k, v in to_original_names(sd).items()},
        lambda sd: {k: v.numpy() for k, v in sd.items()},
    ],
    ids=["original", "ddp", "ddp+original", "numpy"],
)
def test_renamed_state_dict_converts_identically(component, rewrite):
    name, sd, module, want = component
    assert_same_tree(wj.convert_state_dict(rewrite(sd), module), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("original", [False, True], ids=["diffusers", "original"])
def test_half_precision_state_dict(component, dtype, original):
    name, sd, module, _ = component
    half = {k: v.to(dtype) for k, v in sd.items()}
    want = wj.convert_state_dict({k: v.float() for k, v in half.items()}, module)
    got = wj.convert_state_dict(to_original_names(half) if original else half, module)
    assert_same_tree(got, want)


def test_original_in_proj_split_uses_each_blocks_own_width():
    module = COMPONENTS["decoder"][1]()
    widths = {v.shape[0] for k, v in torch_decoder().state_dict().items() if k.endswith("attention.to_q.bias")}
    assert widths == {16, 24}  # the precondition of the bug: attention blocks of two widths
    got = wj.convert_state_dict(to_original_names(torch_decoder().state_dict()), module)
    want = abstract_variables(module)
    assert jax.tree_util.tree_map(lambda x: x.shape, got) == jax.tree_util.tree_map(lambda x: x.shape, want)


@pytest.mark.parametrize("name", [*COMPONENTS, "text_encoder"])
def test_convert_state_dict_equals_load_component_and_runs(tmp_path, name):
    make_ref = torch_clip if name == "text_encoder" else COMPONENTS[name][0]
    ref = make_ref(seed=1)
    module, loaded = wj.load_component(save_component(ref, tmp_path / name))
    converted = wj.convert_state_dict(ref.state_dict(), module)
    assert_same_tree(converted, loaded)
    inputs = random_inputs(module)
    if name == "text_encoder":
        inputs = [np.abs(x.astype(np.int32)) % 100 for x in inputs]
    out = jax.jit(module.apply)(converted, *inputs)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(out, jax.jit(module.apply)(loaded, *inputs))


# ---------------------------------------------------------------------------------------------------------------
# 2) bad folders, files and configs


def test_weights_error_is_a_value_error():
    assert issubclass(wj.WeightsError, ValueError)


def test_folder_with_config_but_no_weights(prior_folder):
    (prior_folder / WEIGHTS).unlink()
    with pytest.raises(wj.WeightsError, match=re.escape(str(prior_folder)) + r": no weights found"):
        wj.load_component(prior_folder)


def test_folder_without_config(prior_folder):
    (prior_folder / "config.json").unlink()
    with pytest.raises(wj.WeightsError, match=re.escape(str(prior_folder)) + r": no config\.json"):
        wj.load_component(prior_folder)


@pytest.mark.parametrize("make", [lambda d: d / WEIGHTS, lambda d: d / "does-not-exist"], ids=["file", "missing"])
def test_not_a_directory(prior_folder, make):
    path = make(prior_folder)
    with pytest.raises(wj.WeightsError, match=re.escape(str(path)) + r": not a directory"):
        wj.load_component(path)


def _header(obj) -> bytes:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "corrupt,problem",
    [
        (lambda data: data[: len(data) // 2], r"truncated"),
        (lambda data: np.random.default_rng(0).bytes(4096), r"corrupt or truncated safetensors header"),
        (lambda data: _header(b"{this is not json!") + bytes(64), r"corrupt safetensors header"),
        (lambda data: _header(b"\xff\xfe\x00garbage") + bytes(64), r"corrupt safetensors header"),
        (lambda data: _header([1, 2, 3]), r"corrupt safetensors header \(not a JSON object\)"),
        (lambda data: struct.pack("<Q", 10_000) + b'{"a": 1}', r"corrupt or truncated safetensors header"),
        (lambda data: b"\x01\x02\x03", r"not a safetensors file \(only 3 bytes"),
        (lambda data: b"", r"not a safetensors file \(only 0 bytes"),
        (
            lambda data: _header({"x": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}) + bytes(8),
            r"tensor 'x' has an unsupported or malformed entry",
        ),
        (
            lambda data: _header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}) + bytes(8),
            r"tensor 'x' spans 8 B but shape \(4,\) needs 16",
        ),
    ],
    ids=[
        "cut-in-half",
        "random-bytes",
        "garbage-json",
        "invalid-utf8",
        "json-not-object",
        "header-longer-than-file",
        "3-bytes",
        "empty",
        "unknown-dtype",
        "wrong-byte-span",
    ],
)
def test_corrupt_safetensors(prior_folder, corrupt, problem):
    weights = prior_folder / WEIGHTS
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(wj.WeightsError, match=re.escape(str(weights)) + r": .*" + problem):
        wj.load_component(prior_folder)


@pytest.mark.parametrize(
    "config,problem",
    [
        ({"_class_name": "UNet2DConditionModel"}, r"not a wurst_jax component \(class 'UNet2DConditionModel'"),
        ({"model_type": "bert", "architectures": ["BertModel"]}, r"not a wurst_jax component"),
        ([1, 2], r"expected a JSON object"),
        ("{not json", r"not valid JSON"),
    ],
    ids=["diffusers-unet", "transformers-bert", "json-list", "invalid-json"],
)
def test_config_of_another_kind(prior_folder, config, problem):
    path = prior_folder / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(wj.WeightsError, match=re.escape(str(path)) + r": " + problem):
        wj.load_component(prior_folder)


def test_prior_config_with_decoder_weights(tmp_path, prior_folder):
    decoder = save_component(torch_decoder(), tmp_path / "decoder")
    shutil.copy(decoder / WEIGHTS, prior_folder / WEIGHTS)
    weights = re.escape(str(prior_folder / WEIGHTS))
    with pytest.raises(wj.WeightsError, match=weights + r": the weights do not fit the model") as e:
        wj.load_component(prior_folder)
    msg = str(e.value)
    assert re.search(r"^  missing \(\d+\):$", msg, re.M) and re.search(r"^  unexpected \(\d+\):$", msg, re.M)
    assert "params/cond_mapper_0/kernel" in msg  # a prior parameter
    assert "clip_mapper.weight" in msg  # a decoder tensor


def test_sharded_index_naming_a_missing_shard(tmp_path):
    folder = save_component(torch_prior(), tmp_path / "prior", max_shard_size="20KB")
    index = folder / f"{WEIGHTS}.index.json"
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(wj.WeightsError, match=re.escape(str(index)) + r": lists shards .*" + re.escape(shard.name)):
        wj.load_component(folder)


def test_one_error_lists_every_missing_unexpected_and_misshaped_key(prior_folder):
    sd = {k: v.contiguous() for k, v in torch_prior().state_dict().items()}
    removed = ["blocks.2.attention.to_k.weight", "cond_mapper.2.bias"]
    for k in removed:
        del sd[k]
    sd["extra_head.weight"] = torch.zeros(3, 3)
    sd["projection.weight"] = torch.zeros(32, 8, 1, 1)  # model expects (32, 16, 1, 1)
    save_file(sd, prior_folder / WEIGHTS)
    with pytest.raises(wj.WeightsError) as e:
        wj.load_component(prior_folder)
    msg = str(e.value)
    assert msg.startswith(f"{prior_folder / WEIGHTS}: the weights do not fit the model")
    for k in removed:
        assert k in msg or flax_path(k) in msg, k
    assert "extra_head.weight" in msg
    assert "projection.weight: checkpoint (32, 8, 1, 1), model expects (32, 16, 1, 1)" in msg
    assert re.search(r"missing \(\d\).*unexpected \(1\).*mis-shaped \(1\)", msg, re.S)


def test_misshaped_key_is_not_also_reported_missing():
    sd = dict(torch_prior().state_dict())
    sd["projection.weight"] = torch.zeros(32, 8, 1, 1)
    with pytest.raises(wj.WeightsError) as e:
        wj.convert_state_dict(sd, COMPONENTS["prior"][1]())
    assert "mis-shaped (1)" in str(e.value)
    assert "missing" not in str(e.value)


def test_state_dict_errors_list_every_key_too():
    sd = dict(torch_vqgan().state_dict())
    del sd["vquantizer.embedding.weight"]
    sd["out_block.0.bias"] = torch.zeros(5)
    sd["module.extra"] = torch.zeros(1)
    with pytest.raises(wj.WeightsError, match=r"^my_sd: the weights do not fit the model") as e:
        wj.convert_state_dict(sd, COMPONENTS["vqgan"][1](), name="my_sd")
    msg = str(e.value)
    assert "vquantizer" in msg and "out_block.0.bias: checkpoint (5,), model expects (12,)" in msg
    assert re.search(r"^    extra$", msg, re.M)  # the DDP prefix is stripped from unexpected keys too


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_dtype(prior_folder, dtype):
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype"):
        wj.load_component(prior_folder, dtype=dtype)


def _write_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


@pytest.mark.parametrize(
    "changes,problem",
    [
        ({"blocks": [1, 1, 2]}, r"StageBConfig\.blocks needs 4 entries"),
        ({"level_config": ["CT", "CTA", "CTX", "CTA"]}, r"block types are C, T and A"),
        ({"dropout": [0.0, 0.0]}, r"StageBConfig\.dropout needs one value or 4"),
        ({"c_hidden": 8}, r"has no len"),
        ({"no_such_field": 1, "blocks": [1]}, r"StageBConfig\.blocks"),
    ],
    ids=["blocks-length", "level-config", "dropout-length", "c_hidden-int", "unknown-key-ignored"],
)
def test_invalid_decoder_config(tmp_path, changes, problem):
    folder = save_component(torch_decoder(), tmp_path / "decoder")
    path = _write_config(folder, **changes)
    with pytest.raises(wj.WeightsError, match=re.escape(str(path)) + r": invalid StageBConfig: .*" + problem):
        wj.load_component(folder)


@pytest.mark.parametrize(
    "component_name,changes",
    [
        ("prior", {"nhead": 5}),  # c=32 is not divisible by 5
        ("prior", {"nhead": 0}),
        ("prior", {"c_in": "16"}),
        ("prior", {"depth": 2.0}),
        ("decoder", {"nhead": [-1, 3, 2, 2]}),  # c_hidden[1]=16 is not divisible by 3
    ],
    ids=["prior-nhead-5", "prior-nhead-0", "prior-c_in-str", "prior-depth-float", "decoder-nhead-3"],
)
def test_unbuildable_config_raises_weights_error(tmp_path, component_name, changes):
    folder = save_component(COMPONENTS[component_name][0](), tmp_path / component_name)
    path = _write_config(folder, **changes)
    with pytest.raises(wj.WeightsError, match=re.escape(str(path))):
        wj.load_component(folder)


# ---------------------------------------------------------------------------------------------------------------
# 3) PyTorch pickles are not read


def test_bin_only_folder(tmp_path):
    folder = save_component(torch_prior(), tmp_path / "prior", safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file() and not (folder / WEIGHTS).exists()
    with pytest.raises(wj.WeightsError, match=re.escape(str(folder)) + r": no weights found .*\.safetensors"):
        wj.load_component(folder)
