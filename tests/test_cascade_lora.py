"""Original Stable Cascade LoRA files (Stability-AI/StableCascade `modules/lora.py`) on the tiny stage C prior.

The torch reference is diffusers' StableCascadeUNet with the original parametrisation applied by hand in this file:
`W + (lora_up @ lora_down) / rank` on every module whose original name contains '.attn' (MultiheadAttention's
in_proj = diffusers' to_q/to_k/to_v stacked, and its out_proj = to_out.0), numbered as the original's
`generator.modules()` walk finds them (per attention: out_proj, then in_proj), and ReToken rows added to the CLIP
token embedding.
"""

import copy

import jax
import numpy as np
import pytest
import torch
from cascade_checkpoints import TEXT, unet
from conftest import clip_tokenizer, nchw, nhwc, randomize, rel_err
from safetensors.numpy import save_file

import wurst_jax as wj
from wurst_jax.lora import read_lora_file
from wurst_jax.lora.adapter import merge
from wurst_jax.lora.peft_format import LoraError
from wurst_jax.models.cascade import StableCascadeUNetConfig

RANK = 3
TOKENS = np.array([320, 1929, 49406])  # ids of the prompt "a cat" (+ BOS): the text conditioning moves too


def original_sites(ref: torch.nn.Module) -> list[tuple[str, bool]]:
    """(diffusers attention module name, is in_proj) in the order the original numbers its LoRA modules."""
    from diffusers.models.attention_processor import Attention

    out = []
    for name, module in ref.named_modules():
        if isinstance(module, Attention):
            out += [(name, False), (name, True)]  # out_proj's parametrisation is met before attn's own
    return out


def original_file(ref, path, seed, tokens=TOKENS, token_dim=TEXT["hidden_size"]):
    """An original-format `lora.safetensors` of random factors for `ref` (and ReToken rows for `tokens`)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, (name, in_proj) in enumerate(original_sites(ref)):
        c = ref.get_submodule(name).to_q.weight.shape[0]
        tensors[f"weights.{i}.lora_down"] = rng.standard_normal((RANK, c), np.float32) * 0.3
        tensors[f"weights.{i}.lora_up"] = rng.standard_normal((3 * c if in_proj else c, RANK), np.float32) * 0.3
    tensors["embeddings.embeddings"] = rng.standard_normal((len(tokens), token_dim), np.float32)
    tensors["embeddings.indices"] = np.asarray(tokens, np.int64)
    save_file(tensors, str(path))
    return tensors


def torch_with_lora(ref, tensors, scale=1.0):
    """The original parametrisation on a copy of `ref`: W + scale · (up @ down) / rank."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for i, (name, in_proj) in enumerate(original_sites(ref)):
            down = torch.from_numpy(tensors[f"weights.{i}.lora_down"])
            up = torch.from_numpy(tensors[f"weights.{i}.lora_up"])
            delta = scale * (up @ down) / down.shape[0]
            attn = ref.get_submodule(name)
            if in_proj:
                for w, d in zip((attn.to_q.weight, attn.to_k.weight, attn.to_v.weight), delta.chunk(3), strict=True):
                    w.add_(d)
            else:
                attn.to_out[0].weight.add_(delta)
    return ref


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    """A tiny Stable Cascade prior folder, its torch UNet, and two original-format LoRA files."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sclora")
    tok = clip_tokenizer(root / "tok")
    te = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)), 1, 0.1)
    prior = unet(StableCascadeUNetConfig.tiny_prior(), 4)
    StableCascadePriorPipeline(tok, te, prior, DDPMWuerstchenScheduler()).save_pretrained(root / "prior")
    files = {"a": root / "a" / "lora.safetensors", "b": root / "b.safetensors"}
    files["a"].parent.mkdir()
    tensors = {"a": original_file(prior, files["a"], 0), "b": original_file(prior, files["b"], 1, tokens=[7])}
    return dict(root=root, ref=prior, files=files, tensors=tensors)


def test_unet_matches_torch_with_the_original_parametrisation(sc):
    module, variables = wj.load_component(sc["root"] / "prior" / "prior")
    _, text = wj.load_component(sc["root"] / "prior" / "text_encoder")
    adapters = read_lora_file(sc["files"]["a"].parent, {"prior": variables, "text_encoder": text})  # the folder
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 16), np.float32)
    r = np.array([0.7, 0.2], np.float32)
    pooled, text = rng.standard_normal((2, 1, 12), np.float32), rng.standard_normal((2, 6, 12), np.float32)
    img = rng.standard_normal((2, 1, 10), np.float32)
    run = jax.jit(lambda v, s: module.apply(merge(v, [(adapters["prior"], s)]), x, r, pooled, text, img))
    t = torch.from_numpy
    for scale in (1.0, 0.5):
        ref = torch_with_lora(sc["ref"], sc["tensors"]["a"], scale)
        with torch.no_grad():
            want = nhwc(ref(nchw(x), t(r), t(pooled), t(text), t(img)).sample)
        err = rel_err(run(variables, np.float32(scale)), want)
        print(f"scale {scale}: rel err {err:.2e}")
        assert err < 1e-4
    with torch.no_grad():
        base = nhwc(sc["ref"](nchw(x), t(r), t(pooled), t(text), t(img)).sample)
    assert rel_err(want, base) > 1e-2  # the adapter does change the output


def test_pipeline_unfused_fused_scales_several_adapters_unload(sc):
    pipe = wj.StableCascadePriorPipeline.from_pretrained(sc["root"] / "prior", progress=False)
    rng = np.random.default_rng(5)
    lat, noise = rng.standard_normal((1, 2, 2, 16), np.float32), rng.standard_normal((2, 1, 2, 2, 16), np.float32)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=1.0, latents=lat, step_noise=noise, seed=0)
    run = lambda: np.asarray(pipe("a cat", **kw).image_embeddings)  # noqa: E731
    base = run()
    embedding = ("params", "text_model", "embeddings", "token_embedding", "embedding")
    table0 = np.asarray(_leaf(pipe.text.encoder.variables, embedding))

    pipe.load_lora_weights(sc["files"]["a"], adapter_name="a", scale=0.7)
    table_a = np.asarray(_leaf(pipe.text.encoder.variables, embedding))
    changed = np.flatnonzero(np.any(table_a != table0, axis=1))
    assert changed.tolist() == sorted(TOKENS.tolist())  # ReToken: exactly its rows, by scale · row
    rows = sc["tensors"]["a"]["embeddings.embeddings"]
    np.testing.assert_allclose(table_a[TOKENS] - table0[TOKENS], 0.7 * rows, rtol=1e-5, atol=1e-6)

    # both adapters loaded first, so that every unfused call below is one compiled loop (adapters are arguments)
    pipe.load_lora_weights(sc["files"]["b"], adapter_name="b", scale=0.0)
    assert pipe.get_active_adapters() == {"a": 0.7}
    unfused = run()
    assert rel_err(unfused, base) > 1e-3
    pipe.fuse_lora()
    fused = run()  # the program without adapters
    print(f"fused vs unfused: {rel_err(fused, unfused):.2e}")
    assert rel_err(fused, unfused) <= 1e-5
    pipe.unfuse_lora()

    pipe.set_adapters(["a", "b"], [0.7, 1.0])
    both = run()
    assert rel_err(both, unfused) > 1e-3
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    print(f"scale 0 vs none: {rel_err(run(), base):.2e}")
    assert rel_err(run(), base) <= 1e-6
    assert np.array_equal(np.asarray(_leaf(pipe.text.encoder.variables, embedding)), table0)
    pipe.set_adapters(["a", "b"], [0.7, 1.0])
    pipe.unload_lora_weights("b")
    assert pipe.get_active_adapters() == {"a": 0.7}
    assert np.array_equal(np.asarray(_leaf(pipe.text.encoder.variables, embedding)), table_a)
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == {}
    assert np.array_equal(run(), base)


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_bad_files_raise_one_error_listing_every_problem(sc, tmp_path):
    _, variables = wj.load_component(sc["root"] / "prior" / "prior")
    _, text = wj.load_component(sc["root"] / "prior" / "text_encoder")
    good = dict(sc["tensors"]["a"])
    n = sum(k.startswith("weights.") for k in good) // 2
    bad = dict(good)
    bad["weights.0.lora_up"] = np.zeros((5, RANK), np.float32)  # mis-shaped
    bad[f"weights.{n}.lora_down"] = bad[f"weights.{n}.lora_up"] = np.zeros((RANK, 4), np.float32)  # one too many
    bad["weights.1.lora_scale"] = np.zeros(1, np.float32)  # unknown key
    bad["embeddings.indices"] = np.array([1, 2, 60000])  # past the vocabulary
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError) as e:
        read_lora_file(tmp_path / "bad.safetensors", {"prior": variables, "text_encoder": text})
    msg = str(e.value)
    print(msg)
    assert "4 problem(s), nothing applied" in msg
    for part in ("weights.0 (", "[out, in]", f"weights.{n}:", "weights.1.lora_scale", "60000"):
        assert part in msg
    # a pipeline keeps nothing of a rejected file
    pipe = wj.StableCascadePriorPipeline.from_pretrained(sc["root"] / "prior", progress=False)
    with pytest.raises(LoraError, match="nothing applied"):
        pipe.load_lora_weights(tmp_path / "bad.safetensors", adapter_name="bad")
    assert pipe.get_active_adapters() == {} and not any(t.adapters for t in pipe._lora().values())
    with pytest.raises(LoraError, match="module_filters"):  # filters that select other modules: other numbering
        pipe.load_lora_weights(sc["files"]["a"], module_filters=[".attention", "kv_mapper"])


def one_level_prior():
    """tiny_prior cut to one level of two attention blocks (down and up): the cheapest training compile."""
    import dataclasses

    import flax.linen as nn

    from wurst_jax.models import registry

    cfg = dataclasses.replace(
        StableCascadeUNetConfig.tiny_prior(),
        block_out_channels=(16,),
        num_attention_heads=(2,),
        down_num_layers_per_block=(1,),
        up_num_layers_per_block=(1,),
        down_blocks_repeat_mappers=(1,),
        up_blocks_repeat_mappers=(1,),
        block_types_per_layer=(StableCascadeUNetConfig.tiny_prior().block_types_per_layer[0],),
        dropout=(0.0,),
        switch_level=None,
    )
    spec = registry.get("cascade_unet")
    module = spec.build(cfg)
    shapes = nn.unbox(jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *spec.example_inputs(cfg)))
    rng = np.random.default_rng(2)
    return module, jax.tree_util.tree_map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(np.float32), shapes)


def test_train_only_the_adapter_then_save_and_load_gives_the_same_outputs(sc, tmp_path):
    from wurst_jax.lora.cascade_format import write_file
    from wurst_jax.lora.train import add_lora, cascade_weights, is_lora, lora_loss, merged
    from wurst_jax.train import objectives
    from wurst_jax.train.config import RunConfig
    from wurst_jax.train.setup import build_train_setup
    from wurst_jax.train.state import merge_params

    module, variables = one_level_prior()
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    batch = {"latents": f32(2, 2, 2, 16), "text": f32(2, 6, 12), "pooled": f32(2, 1, 12)}
    empty = {"text": np.zeros((1, 6, 12), np.float32), "pooled": np.zeros((1, 1, 12), np.float32)}
    run = RunConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, ema_decay=0.0, cond_dropout=0.0)
    loss = objectives.component_loss("c", module, empty, 0.0, "p2")
    params = add_lora(variables["params"], rank=2, targets="attention", seed=0, style="cascade")
    setup = build_train_setup(lora_loss(loss), {"params": params}, run, trainable=is_lora)
    state = setup.state
    for _ in range(run.steps):
        state, _ = setup.step(state, batch)
    trained = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert trained == {"sc_lora_down", "sc_lora_up", "in_proj_sc_lora_down", "in_proj_sc_lora_up"}
    frozen, base = jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(variables["params"])
    assert len(frozen) == len(base) and all(np.array_equal(a, b) for a, b in zip(frozen, base, strict=True))

    full = merge_params(state.params, state.frozen)
    path = write_file(tmp_path, cascade_weights(full), token_dim=12)
    assert path.name == "lora.safetensors"
    from safetensors.numpy import load_file

    saved = load_file(str(path))  # the original's `lora` ModuleDict state dict: 12 LoRA modules + an empty ReToken
    assert saved["weights.1.lora_down"].shape == (2, 16) and saved["weights.1.lora_up"].shape == (48, 2)
    assert saved["embeddings.embeddings"].shape == (0, 12) and len(saved) == 2 * 4 + 2
    adapters = read_lora_file(tmp_path, {"prior": variables})
    x, r = f32(2, 3, 2, 16), np.array([0.8, 0.3], np.float32)
    args = (x, r, batch["pooled"], batch["text"], np.zeros((2, 1, 10), np.float32))

    @jax.jit
    def outputs(full, layers):  # the trained tree and the file's adapter: one compile
        return [module.apply(v, *args) for v in ({"params": merged(full)}, merge(variables, [(layers, 1.0)]))]

    want, got = outputs(full, adapters["prior"])
    print(f"trained vs saved + loaded: {rel_err(got, want):.2e}")
    assert rel_err(got, want) <= 1e-5
    assert all(np.abs(down).max() > 0 for down, _ in cascade_weights(full))  # trained: lora_down starts at zeros
