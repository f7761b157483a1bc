"""The conversion tool and our checkpoints: PyTorch → orbax → Flax, Flax → diffusers, every bad input refused."""

import dataclasses
import functools
import json
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import torch_clip, torch_decoder, torch_prior, torch_vqgan
from safetensors.torch import save_file
from test_weights import assert_same_tree, random_inputs, to_original_names

import wurst_jax as wj
from wurst_jax.cli import convert as convert_cli
from wurst_jax.cli.convert import run_convert
from wurst_jax.models import abstract_variables
from wurst_jax.weights import converted as conversion
from wurst_jax.weights import export_component, restore_variables
from wurst_jax.weights.converted import convert_checkpoint
from wurst_jax.weights.export import torch_tensors

WEIGHTS = "diffusion_pytorch_model.safetensors"
REFS = {"prior": torch_prior, "decoder": torch_decoder, "vqgan": torch_vqgan, "text_encoder": torch_clip}
TINY = {"prior": wj.StageCConfig.tiny(), "decoder": wj.StageBConfig.tiny(), "vqgan": wj.StageAConfig.tiny()}


def main(*argv) -> int:
    return convert_cli.main([str(a) for a in argv] + ["--quiet"])


def leftovers(folder) -> list[str]:
    """Temporary or moved-aside folders the converter may have left next to its output."""
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def latents(module):
    return np.random.default_rng(1).standard_normal((1, 4, 4, module.config.latent_channels)).astype(np.float32)


@functools.cache
def jitted(module, method=None):
    return jax.jit(functools.partial(module.apply, method=method))


def apply(module, variables, inputs):
    """The module's outputs on `inputs` (VQGAN: encode and decode), compiled once per module."""
    if isinstance(module, wj.PaellaVQModel):
        return jitted(module, "encode")(variables, *inputs), jitted(module, "decode")(variables, latents(module))
    if isinstance(module, wj.CLIPTextModel):
        inputs = [np.abs(x.astype(np.int32)) % 100 for x in inputs]
    return (jitted(module)(variables, *inputs),)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny component saved by diffusers / transformers: {name: (torch model, folder)}."""
    root = tmp_path_factory.mktemp("components")
    out = {}
    for name, make in REFS.items():
        ref = make(seed=7)
        ref.save_pretrained(root / name)
        out[name] = (ref, root / name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1) PyTorch → orbax → Flax


@pytest.mark.parametrize("name", list(REFS))
def test_converted_folder_restores_identical_variables_and_outputs(saved, tmp_path, name):
    _, folder = saved[name]
    dst = convert_checkpoint(folder, tmp_path / name)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "orbax", conversion.MANIFEST]
    module, direct = wj.load_component(folder)
    module2, restored = wj.load_component(dst)
    assert module2 == module
    assert_same_tree(restored, direct)
    inputs = random_inputs(module)
    for a, b in zip(apply(module, direct, inputs), apply(module, restored, inputs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_dtype_on_conversion_and_on_restore(saved, tmp_path):
    folder = saved["prior"][1]
    f32 = convert_checkpoint(folder, tmp_path / "f32")
    bf16 = convert_checkpoint(folder, tmp_path / "bf16", dtype="bfloat16")
    _, want_bf16 = wj.load_component(folder, dtype=jnp.bfloat16)
    assert_same_tree(wj.load_component(f32, dtype=jnp.bfloat16)[1], want_bf16)  # cast while restoring
    assert_same_tree(wj.load_component(bf16, dtype=jnp.bfloat16)[1], want_bf16)
    up = wj.load_component(bf16)[1]  # stored bf16, asked for f32
    assert_same_tree(up, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), want_bf16))
    manifest = json.loads((bf16 / conversion.MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["components"]["prior"]["parameters"] > 0
    assert set(manifest["sha256"]) == {"config.json", WEIGHTS}
    assert {"jax", "flax", "orbax-checkpoint", "wurst_jax"} <= set(manifest["versions"])


def test_restore_into_given_shardings(saved, tmp_path):
    dst = convert_checkpoint(saved["vqgan"][1], tmp_path / "vqgan")
    module, want = wj.load_component(dst)
    target = abstract_variables(module)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    got = restore_variables(dst / "orbax", target, one)
    assert all(x.sharding == one for x in jax.tree_util.tree_leaves(got))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = jax.tree_util.tree_map(lambda _: rep, target)
    got = restore_variables(dst / "orbax", target, tree)
    assert all(x.sharding == rep for x in jax.tree_util.tree_leaves(got))
    assert_same_tree(got, want)


def test_orbax_checkpoint_that_does_not_fit_its_config(saved, tmp_path):
    dst = convert_checkpoint(saved["prior"][1], tmp_path / "prior")
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "c_in": 8}))
    with pytest.raises(wj.WeightsError, match=re.escape(str(dst / "orbax")) + r": the checkpoint does not fit") as e:
        wj.load_component(dst)
    assert "params/projection/kernel: checkpoint (1, 1, 16, 32), model expects (1, 1, 8, 32)" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# 2) Flax → diffusers / transformers


def reference_class(name):
    import transformers
    from diffusers.pipelines.deprecated import wuerstchen

    return {
        "prior": wuerstchen.WuerstchenPrior,
        "decoder": wuerstchen.WuerstchenDiffNeXt,
        "vqgan": wuerstchen.PaellaVQModel,
        "text_encoder": transformers.CLIPTextModel,
    }[name]


def torch_outputs(name, module, model, inputs):
    from conftest import nchw, nhwc

    with torch.no_grad():
        if name == "vqgan":
            return nhwc(model.encode(nchw(inputs[0])).latents), nhwc(model.decode(nchw(latents(module))).sample)
        if name == "text_encoder":
            ids = torch.from_numpy(np.abs(inputs[0].astype(np.int64)) % 100)
            return (model(ids, attention_mask=torch.from_numpy(inputs[1] * 0 + 1)).last_hidden_state.numpy(),)
        if name == "prior":
            return (nhwc(model(nchw(inputs[0]), torch.from_numpy(inputs[1]), torch.from_numpy(inputs[2]))),)
        return (
            nhwc(model(nchw(inputs[0]), torch.from_numpy(inputs[1]), nchw(inputs[2]), torch.from_numpy(inputs[3]))),
        )


@pytest.mark.parametrize("name", list(REFS))
def test_export_loads_strictly_in_the_reference_with_equal_outputs(saved, tmp_path, name):
    _, folder = saved[name]
    module, variables = wj.load_component(folder)
    # "fine-tuned": every weight moved, so a copy of the original file would not pass
    rng = np.random.default_rng(0)
    tuned = jax.tree_util.tree_map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32), variables)
    if "batch_stats" in tuned:
        tuned["batch_stats"] = jax.tree_util.tree_map(jnp.abs, tuned["batch_stats"])
    out = export_component(module, tuned, tmp_path / name)
    model, info = reference_class(name).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    model.eval()
    inputs = random_inputs(module, seed=3)
    if name == "text_encoder":
        inputs[1] = np.ones_like(inputs[1])
    ours = apply(module, tuned, inputs)
    theirs = torch_outputs(name, module, model, inputs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)
    # and the export converts back to the same tree, bit for bit
    assert_same_tree(wj.load_component(out)[1], tuned)


def test_export_bf16_and_config(saved, tmp_path):
    from safetensors import safe_open

    module, variables = wj.load_component(saved["vqgan"][1], dtype=jnp.bfloat16)
    out = export_component(module, variables, tmp_path / "vqgan")
    with safe_open(out / WEIGHTS, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("in_block.1.weight").dtype == torch.bfloat16
        assert f.get_tensor("down_blocks.3.1.running_var").dtype == torch.float32  # statistics stay f32
        assert f.get_tensor("down_blocks.3.1.num_batches_tracked").dtype == torch.int64
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "PaellaVQModel" and "_diffusers_version" in config
    text = export_component(*wj.load_component(saved["text_encoder"][1]), tmp_path / "te")
    config = json.loads((text / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    assert (text / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["prior", "vqgan", "text_encoder"])
def test_export_names_match_the_full_size_reference(name):
    """Two-digit indices (`blocks.95`) and every layer type of the released configs: names and shapes."""
    import transformers

    cfg = {"prior": wj.StageCConfig.v2(), "vqgan": wj.StageAConfig.v2(), "text_encoder": wj.CLIPTextConfig.vit_bigg()}
    cls = {"prior": wj.WuerstchenPrior, "vqgan": wj.PaellaVQModel, "text_encoder": wj.CLIPTextModel}[name]
    kwargs = dataclasses.asdict(cfg[name])
    with torch.device("meta"):
        if name == "text_encoder":
            ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs))
        else:
            ref = reference_class(name)(**kwargs)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    module = cls(cfg[name])
    got = {k.removeprefix("text_model."): tuple(s) for k, s, _, _ in torch_tensors(module, abstract_variables(module))}
    assert got == want


# ---------------------------------------------------------------------------------------------------------------
# 3) original checkpoints: .pt and single .safetensors


@pytest.fixture(scope="module")
def original_files(tmp_path_factory, saved):
    root = tmp_path_factory.mktemp("original")
    out = {}
    for name in TINY:
        sd = to_original_names(saved[name][0].state_dict())
        torch.save({"state_dict": sd, "epoch": 3}, root / f"{name}.pt")
        save_file({k: v.contiguous() for k, v in sd.items()}, root / f"{name}.safetensors")
        out[name] = (root / f"{name}.pt", root / f"{name}.safetensors")
    return out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", list(TINY))
def test_original_checkpoint_equals_diffusers_layout(saved, original_files, tmp_path, name, suffix):
    src = original_files[name][suffix == ".safetensors"]
    config = json.dumps(dataclasses.asdict(TINY[name]))
    assert main(src, tmp_path / "out", "--stage", name, "--config", config) == 0
    assert_same_tree(wj.load_component(tmp_path / "out")[1], wj.load_component(saved[name][1])[1])
    manifest = json.loads((tmp_path / "out" / conversion.MANIFEST).read_text())
    assert manifest["source_format"] == ("original-pt" if suffix == ".pt" else "original-safetensors")


def test_ema_weights_are_preferred(saved, tmp_path):
    sd = saved["vqgan"][0].state_dict()
    other = torch_vqgan(seed=11).state_dict()
    torch.save({"state_dict": other, "ema_state_dict": sd}, tmp_path / "both.pt")
    dst = convert_checkpoint(
        tmp_path / "both.pt", tmp_path / "out", stage="vqgan", config=dataclasses.asdict(TINY["vqgan"])
    )
    assert_same_tree(wj.load_component(dst)[1], wj.load_component(saved["vqgan"][1])[1])
    manifest = json.loads((dst / conversion.MANIFEST).read_text())
    assert manifest["components"]["vqgan"]["state_dict_entry"] == "ema_state_dict"


def test_single_file_stage_is_required_and_cross_checked(original_files, tmp_path, capsys):
    pt = original_files["prior"][0]
    assert main(pt, tmp_path / "a") == 2
    assert re.search(r"pass --stage \(its tensors look like a prior checkpoint\)", capsys.readouterr().err)
    assert main(pt, tmp_path / "b", "--stage", "decoder") == 2
    assert re.search(
        r"--stage decoder, but its tensors are a prior checkpoint's \('cond_mapper", capsys.readouterr().err
    )
    # without --config the official v2 config is used, which these tiny weights do not fit
    assert main(pt, tmp_path / "c", "--stage", "prior") == 2
    assert "the weights do not fit the model" in capsys.readouterr().err
    assert not leftovers(tmp_path) and not any((tmp_path / n).exists() for n in "abc")


class _RunsCode:
    """Unpickling this calls os.system: the attack a .pt file can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_and_not_executed(tmp_path, capsys, writer):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.zeros(2)}, "evil": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    assert main(path, tmp_path / "out", "--stage", "prior") == 2
    err = capsys.readouterr().err
    assert f"{path}: refused: the pickle holds objects other than tensors" in err
    assert not marker.exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "content,problem",
    [(None, r"not a readable PyTorch checkpoint"), ([1, 2], r"expected a dict"), ({"x": 1}, r"no state dict found")],
    ids=["empty", "list", "no-tensors"],
)
def test_pt_that_is_not_a_checkpoint(tmp_path, content, problem):
    if content is None:
        (tmp_path / "x.pt").write_bytes(b"")
    else:
        torch.save(content, tmp_path / "x.pt")
    with pytest.raises(wj.WeightsError, match=re.escape(str(tmp_path / "x.pt")) + r": " + problem):
        convert_checkpoint(tmp_path / "x.pt", tmp_path / "out", stage="prior")


# ---------------------------------------------------------------------------------------------------------------
# 4) whole pipelines


def test_pipeline_folders_convert_and_generate_the_same_images(tiny_checkpoints, tmp_path):
    decoder_dir, prior_dir, _ = tiny_checkpoints
    dst_dec, dst_prior = tmp_path / "wuerstchen", tmp_path / "wuerstchen-prior"
    assert main(decoder_dir, dst_dec) == 0 and main(prior_dir, dst_prior, "--dtype", "float32") == 0
    layouts = (
        (decoder_dir, dst_dec, ("decoder", "vqgan", "text_encoder")),
        (prior_dir, dst_prior, ("prior", "text_encoder")),
    )
    for src, dst, comps in layouts:
        assert all((dst / c / "orbax").is_dir() and not list((dst / c).glob("*.safetensors")) for c in comps)
        for copied in ("tokenizer", "scheduler"):
            assert sorted(p.name for p in (dst / copied).iterdir()) == sorted(p.name for p in (src / copied).iterdir())
        assert (dst / "model_index.json").is_file() and (dst / conversion.MANIFEST).is_file()
    kw = dict(height=128, width=128, prior_num_inference_steps=3, num_inference_steps=2, seed=0, output_type="np")
    images = []
    for dec, prior in ((decoder_dir, prior_dir), (dst_dec, dst_prior)):
        pipe = wj.WuerstchenPipeline.from_pretrained(decoder=dec, prior=prior, progress=False)
        images.append(pipe("a red circle", **kw).images)
    np.testing.assert_array_equal(images[0], images[1])


def test_combined_folder_and_component_subset(tiny_checkpoints, tmp_path):
    combined = tmp_path / "combined"
    tiny_checkpoints[2].save_pretrained(combined)
    dst = convert_checkpoint(combined, tmp_path / "out", components=["prior_prior", "decoder"])
    assert (dst / "prior_prior" / "orbax").is_dir() and (dst / "decoder" / "orbax").is_dir()
    assert (dst / "prior_text_encoder" / "model.safetensors").is_file()  # not selected: copied unchanged
    assert (dst / "prior_tokenizer").is_dir() and (dst / "prior_scheduler").is_dir()
    assert_same_tree(wj.load_component(dst / "prior_prior")[1], wj.load_component(combined / "prior_prior")[1])
    manifest = json.loads((dst / conversion.MANIFEST).read_text())
    assert set(manifest["components"]) == {"prior_prior", "decoder"} and "vqgan" in manifest["copied"]
    with pytest.raises(wj.WeightsError, match=r"no component folder\(s\) \['unet'\]; this pipeline has \["):
        convert_checkpoint(combined, tmp_path / "out2", components=["unet"])


# ---------------------------------------------------------------------------------------------------------------
# 5) bad input and failures: a clear message, exit code ≠ 0, nothing partial left behind


def test_truncated_safetensors(saved, tmp_path, capsys):
    folder = tmp_path / "prior"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved["prior"][1] / "config.json").read_bytes())
    data = (saved["prior"][1] / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert main(folder, tmp_path / "out") == 2
    assert re.search(re.escape(str(folder / WEIGHTS)) + r": truncated file", capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_wrong_component_and_bad_keys(saved, tmp_path, capsys):
    folder = tmp_path / "prior"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved["prior"][1] / "config.json").read_bytes())
    (folder / WEIGHTS).write_bytes((saved["decoder"][1] / WEIGHTS).read_bytes())
    assert main(folder, tmp_path / "out") == 2
    assert "the weights do not fit the model" in capsys.readouterr().err
    sd = {k: v.contiguous() for k, v in saved["prior"][0].state_dict().items()}
    del sd["cond_mapper.2.bias"]
    sd["extra.weight"] = torch.zeros(2)
    sd["projection.weight"] = torch.zeros(32, 8, 1, 1)
    save_file(sd, folder / WEIGHTS)
    assert main(folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "missing (1)" in err and "extra.weight" in err and "mis-shaped (1)" in err
    assert "projection.weight: checkpoint (32, 8, 1, 1), model expects (32, 16, 1, 1)" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_nonfinite_weights_refused_unless_allowed(saved, tmp_path, capsys):
    folder = tmp_path / "vqgan"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved["vqgan"][1] / "config.json").read_bytes())
    sd = {k: v.clone().contiguous() for k, v in saved["vqgan"][0].state_dict().items()}
    sd["in_block.1.weight"][0, 0, 0, 0] = float("nan")
    sd["in_block.1.bias"][1] = float("inf")
    save_file(sd, folder / WEIGHTS)
    assert main(folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    pattern = re.escape(str(folder / WEIGHTS)) + r": tensor 'in_block\.1\.(weight|bias)' has 1 NaN/Inf value\(s\)"
    assert re.search(pattern, err) and "refusing to convert (allow with --allow-nonfinite)" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    with pytest.warns(RuntimeWarning) as record:
        dst = convert_checkpoint(folder, tmp_path / "out", nonfinite="warn")
    assert {re.search(r"tensor '([^']+)'", str(w.message))[1] for w in record} == {
        "in_block.1.weight",
        "in_block.1.bias",
    }
    manifest = json.loads((dst / conversion.MANIFEST).read_text())
    assert sorted(manifest["components"]["vqgan"]["nonfinite_tensors"]) == ["in_block.1.bias", "in_block.1.weight"]
    with pytest.warns(RuntimeWarning, match=r"NaN/Inf"):
        assert main(folder, tmp_path / "out2", "--allow-nonfinite") == 0


def test_destination_cannot_be_written(saved, tmp_path, capsys):
    src = saved["vqgan"][1]
    (tmp_path / "a_file").write_text("")
    assert main(src, tmp_path / "a_file" / "out") == 2  # parent is a file
    assert "cannot write the output" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        assert main(src, locked / "out") == 2
        assert f"{locked / 'out'}: cannot write the output" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_existing_destination_needs_overwrite(saved, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(saved["vqgan"][1], dst) == 2
    assert f"{dst}: already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main(saved["vqgan"][1], dst, "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and (dst / "orbax").is_dir() and not leftovers(tmp_path)
    with pytest.raises(ValueError, match=r"must not be the source"):
        convert_checkpoint(saved["vqgan"][1], saved["vqgan"][1] / "inside")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_interrupted_conversion_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch, capsys, existing):
    decoder_dir = tiny_checkpoints[0]
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    calls = []
    real = conversion.save_variables

    def interrupt_second(variables, directory):
        calls.append(directory)
        if len(calls) == 2:  # the first component is written, the second is not
            raise KeyboardInterrupt
        return real(variables, directory)

    monkeypatch.setattr(conversion, "save_variables", interrupt_second)
    args = [decoder_dir, dst] + (["--overwrite"] if existing else [])
    assert main(*args) == 130
    assert "interrupted" in capsys.readouterr().err and len(calls) == 2
    assert calls[0].is_relative_to(tmp_path) and not calls[0].exists()  # the partial output is gone
    assert not leftovers(tmp_path)
    if existing:
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    else:
        assert not dst.exists()


def test_cli_subcommand_parses():
    import argparse

    parser = argparse.ArgumentParser(prog="wurst-jax")
    convert_cli.add_convert_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "a", "b", "--dtype", "bfloat16", "--components", "prior,text_encoder"])
    assert (args.src, args.dst, args.dtype, args.components) == ("a", "b", "bfloat16", ["prior", "text_encoder"])
    assert args.func is run_convert and not args.overwrite and not args.allow_nonfinite
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "a", "b", "--dtype", "float16"])
