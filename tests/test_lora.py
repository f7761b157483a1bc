"""LoRA on the Würstchen v2 prior pipeline against diffusers/PEFT: a LoRA made with peft on the torch prior and
text encoder, saved by diffusers' `save_lora_weights`, loaded by both sides."""

import copy

import jax
import numpy as np
import pytest
import torch
from conftest import nchw, nhwc, rel_err

import wurst_jax as wj
from wurst_jax.lora import LoraError, merge, read_lora_file, write_lora_file

TOL = 1e-4


def peft_lora(model, targets, seed):
    """(model with a PEFT LoRA injected, non-zero B, its PEFT state dict). peft's own API: transformers'
    `add_adapter` wants peft >= 0.22, which is not on the index."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(model)
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets), model
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, get_peft_model_state_dict(model)


@pytest.fixture(scope="module")
def lora(tiny_checkpoints, tmp_path_factory):
    """(our prior pipeline, diffusers' prior pipeline with the LoRA loaded, the LoRA folder, a second LoRA)."""
    from diffusers import WuerstchenPriorPipeline

    _, prior_dir, combined = tiny_checkpoints
    ref = combined.prior_pipe
    folders, text_refs = [], []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"lora{seed}")
        _, prior_sd = peft_lora(ref.prior, ["to_q", "to_k", "to_v", "to_out.0"], seed)
        te, te_sd = peft_lora(ref.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], seed + 5)
        WuerstchenPriorPipeline.save_lora_weights(out, unet_lora_layers=prior_sd, text_encoder_lora_layers=te_sd)
        WuerstchenPriorPipeline.save_lora_weights(out / "prior_only", unet_lora_layers=prior_sd)
        folders.append(out)
        text_refs.append(te)
    ref = copy.deepcopy(ref)
    # diffusers' loader sends text-encoder keys through transformers' PEFT hook (peft >= 0.22): prior-only file
    ref.load_lora_weights(folders[0] / "prior_only", adapter_name="a")
    ref.text_encoder = text_refs[0]
    ours = wj.WuerstchenPriorPipeline.from_pretrained(prior_dir, progress=False)
    return ours, ref, folders


def prior_outputs(pipe, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((2, 4, 6, 16), np.float32)
    r = np.array([0.8, 0.3], np.float32)
    c = rng.standard_normal((2, 77, 24), np.float32)
    return x, r, c


def run_prior(pipe, x, r, c):
    target = pipe._lora()["prior"]
    variables = pipe.prior.variables
    adapters = target.loop_adapters()
    if adapters:
        variables = merge(variables, adapters)
    return np.asarray(jax.jit(pipe.prior.module.apply)(variables, x, r, c))


def sample(pipe):
    """A 3-step prior run from fixed latents and step noise (exercises the LoRA inside the compiled loop)."""
    rng = np.random.default_rng(1)
    lat = rng.standard_normal((1, 3, 3, 16), np.float32)
    eps = rng.standard_normal((2, 1, 3, 3, 16), np.float32)
    kw = dict(prompt="a cat", height=128, width=128, timesteps=[1.0, 0.5, 0.0], latents=lat, step_noise=eps)
    return pipe(**kw).image_embeddings


def test_prior_and_text_encoder_match_diffusers(lora):
    ours, ref, folders = lora
    ours.load_lora_weights(folders[0], adapter_name="a")
    try:
        x, r, c = prior_outputs(ours)
        with torch.no_grad():
            want = nhwc(ref.prior(nchw(x), r=torch.from_numpy(r), c=torch.from_numpy(c)))
            ids = ref.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
            want_text = ref.text_encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state.numpy()
        got = run_prior(ours, x, r, c)
        ours._lora()["prior"].adapters["a"].scale = 0.0
        base = run_prior(ours, x, r, c)
        ours._lora()["prior"].adapters["a"].scale = 1.0
        assert rel_err(got, want) < TOL
        assert rel_err(base, want) > 1e-2  # the adapter matters
        assert rel_err(ours.text(["a photo of a cat"]), want_text) < TOL
    finally:
        ours.unload_lora_weights()


def test_fused_unfused_scale_zero_and_unload(lora):
    ours, _, folders = lora
    plain = sample(ours)
    ours.load_lora_weights(folders[0], adapter_name="a", scale=0.7)
    ours.load_lora_weights(folders[1], adapter_name="b", scale=0.4)
    unfused = sample(ours)
    executables = len(ours.compiler._executables)
    ours.set_adapters(["a", "b"], [0.0, 0.0])
    zero = sample(ours)
    ours.set_adapters(["b"], [1.5])  # switching and rescaling: no new executable
    only_b = sample(ours)
    assert len(ours.compiler._executables) == executables
    ours.set_adapters(["a", "b"], [0.7, 0.4])
    ours.fuse_lora()
    fused = sample(ours)
    ours.unfuse_lora()
    again = sample(ours)
    ours.unload_lora_weights()
    unloaded = sample(ours)
    assert rel_err(unfused, plain) > 1e-2 and rel_err(only_b, unfused) > 1e-3
    assert rel_err(fused, unfused) < 1e-5 and rel_err(again, unfused) < 1e-6
    np.testing.assert_allclose(zero, plain, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(unloaded, plain)
    assert ours.get_active_adapters() == {}


def test_bad_keys_one_error_nothing_applied(lora, tmp_path):
    from safetensors.numpy import load_file, save_file

    ours, _, folders = lora
    tensors = load_file(str(folders[0] / "pytorch_lora_weights.safetensors"))
    key = next(k for k in tensors if k.startswith("prior.") and k.endswith("to_q.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1]  # mis-shaped
    tensors["prior.blocks.99.attention.to_q.lora_A.weight"] = tensors[key]
    tensors["prior.blocks.99.attention.to_q.lora_B.weight"] = np.zeros((24, 4), np.float32)
    tensors["unet.foo.lora_A.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError) as e:
        ours.load_lora_weights(tmp_path / "bad.safetensors", adapter_name="bad")
    msg = str(e.value)
    assert "3 problem(s)" in msg and "unet.foo" in msg and "blocks.99" in msg and key.rsplit(".lora_A", 1)[0] in msg
    assert ours.get_active_adapters() == {} and not ours._lora()["prior"].adapters


def test_written_file_round_trips_through_diffusers(lora, tmp_path):
    ours, _, folders = lora
    targets = {k: t.shapes() for k, t in ours._lora().items()}
    adapters = read_lora_file(folders[0], targets)
    write_lora_file(tmp_path / "again", adapters)
    back = read_lora_file(tmp_path / "again", targets)
    for prefix in adapters:
        for key, ab in adapters[prefix].items():
            np.testing.assert_array_equal(back[prefix][key]["down"], ab["down"])
            np.testing.assert_array_equal(back[prefix][key]["up"], ab["up"])
