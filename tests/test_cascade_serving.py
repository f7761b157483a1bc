"""Stable Cascade in batch jobs, the server, on a mesh and from bf16 variant files, on one mini folder pair
(tests/cascade_checkpoints.py `mini_prior` / `mini_decoder`: small UNets whose heads split 2 ways).

`ModelSpec` reads the folders as Stable Cascade (model_index.json); a prompt file's images (two sizes, own and
default seeds) equal one pipeline call per prompt bit for bit; `generate --prompts` takes the model with its own
defaults; a real HTTP request on loopback answers with the pipeline's images; dp and tp runs equal one device;
diffusers' variant="bf16" folders load and generate. One pipeline, batches of 2: the shapes compile once and are
shared by every test here (the sharded runs compile their own programs)."""

import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cascade_checkpoints import build, mini_decoder, mini_prior
from jax.sharding import PartitionSpec as P
from test_batch_generate import pixels, write_jsonl
from test_serve import decode, running

import wurst_jax as wj
from wurst_jax import cli
from wurst_jax.serving import ModelSpec, batch, jobs
from wurst_jax.serving.engine import Engine
from wurst_jax.serving.jobs import Defaults
from wurst_jax.serving.server import create_app, parse_generation

FAST = {"prior_steps": 2, "steps": 2}
# group A: 128×128 (two lines, a default and an own seed, a negative prompt); group B: 128×256, other guidance
LINES = [
    {"prompt": "a red circle", "num_images": 2, "height": 128, "width": 128},
    {"prompt": "a blue square", "negative_prompt": "blurry", "num_images": 2, "seed": 7, "height": 128, "width": 128},
    {"prompt": "a photo", "num_images": 2, "seed": 3, "height": 128, "width": 256, "prior_guidance": 2.0},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root, diffusers pipelines) of the mini folder pair."""
    root = tmp_path_factory.mktemp("sc_serving")
    return root, build(root, mini_prior(), mini_decoder())  # small UNets: this file compiles two sizes, three meshes


@pytest.fixture(scope="module")
def folders(saved):
    return saved[0] / "stable-cascade", saved[0] / "stable-cascade-prior"


@pytest.fixture(scope="module")
def spec(folders):
    return ModelSpec.from_folders(*map(str, folders))


@pytest.fixture(scope="module")
def pipe(spec):
    return spec.load(dtype=jnp.float32, progress=False)


def direct(pipe, prompt, seeds, height, width, prior_guidance=4.0, negative_prompt=None):
    """One pipeline call for one prompt: as many images as seeds."""
    return pipe(
        prompt, negative_prompt=negative_prompt, seed=seeds, num_images_per_prompt=len(seeds), height=height,
        width=width, prior_num_inference_steps=2, prior_guidance_scale=prior_guidance, num_inference_steps=2,
    ).images  # fmt: skip


def test_spec_reads_stable_cascade(spec, pipe, folders):
    assert spec.generation == "cascade" and isinstance(pipe, wj.StableCascadeCombinedPipeline)
    assert spec.default_steps == 10 and spec.prior_defaults == {"prior_num_inference_steps": 20}
    spec.check_size(128, 256)  # prior grid 3×6 → decoder grid 32×64 (multiples of the stage B's 4)
    with pytest.raises(ValueError, match="height 64 is not a size this model can make"):
        spec.check_size(64, 128)
    assert ModelSpec.from_folders().generation == "v2"  # the shipped tiny model
    with pytest.raises(ValueError, match=r"--variant bf16: .*decoder has no bf16 weight files"):
        ModelSpec.from_folders(*map(str, folders), variant="bf16")


def test_prompt_file_equals_one_pipeline_call_per_prompt(spec, pipe, tmp_path):
    file = write_jsonl(tmp_path / "prompts.jsonl", [{**x, **FAST} for x in LINES])
    todo = jobs.parse_prompt_file(file, Defaults.for_model(spec, seed=100), spec)
    summary = batch.run_plan(spec.generator(pipe), todo, tmp_path / "out", 2, {"model": {}}, show=False)
    assert summary.images == 6 and not summary.stopped
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in recs] == [100, 101, 7, 8, 3, 4] and {r["decoder_guidance"] for r in recs} == {0.0}
    worst = 0
    for line in LINES:
        group = [r for r in recs if r["prompt"] == line["prompt"]]
        ref = direct(
            pipe, line["prompt"], [r["seed"] for r in group], line["height"], line["width"],
            line.get("prior_guidance", 4.0), line.get("negative_prompt"),
        )  # fmt: skip
        for r, image in zip(group, ref, strict=True):
            got = pixels(tmp_path / "out" / r["file"])
            assert got.shape == (line["height"], line["width"], 3)
            worst = max(worst, int(np.abs(got - np.asarray(image, np.int16)).max()))
    print(f"Stable Cascade prompt file vs one call per prompt: max |Δ| {worst} (uint8)")
    assert worst == 0


def test_generate_prompts_takes_a_stable_cascade_model(folders, tmp_path, monkeypatch, capsys):
    """The command line reaches the batch run with the model's defaults (the run itself is the test above)."""
    seen = {}

    def fake_run_plan(generate, todo, out_dir, batch_size, made_with, **kw):
        seen.update(todo=todo, made_with=made_with)
        return batch.Summary(len(todo), 0, 1.0, 0.0)

    monkeypatch.setattr(ModelSpec, "load", lambda self, **kw: seen.setdefault("spec", self))
    monkeypatch.setattr(batch, "run_plan", fake_run_plan)
    file = tmp_path / "p.txt"
    file.write_text("a red circle\na blue square\n")
    common = ["--model", str(folders[0]), "--prior", str(folders[1]), "--height", "128", "--width", "128"]
    out = tmp_path / "out"
    assert cli.main(["generate", "--prompts", str(file), "--out-dir", str(out), *common, "--quiet"]) == 0
    assert seen["spec"].generation == "cascade"
    settings = {j.settings for j in seen["todo"]}
    assert len(seen["todo"]) == 2 and {(s.steps, s.prior_steps) for s in settings} == {(10, None)}
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    res = cli.main(["generate", "--prompts", str(file), "--out-dir", str(out), *common, "--image", str(image)])
    assert res == 2 and "batch generation (--prompts) is text-to-image only; drop --image" in capsys.readouterr().err


def test_server_answers_with_the_pipeline_images(spec, pipe):
    count, limit = spec.token_counter()
    defaults = Defaults.for_model(spec)
    parse = lambda body: parse_generation(body, defaults, spec, count, limit)  # noqa: E731
    settings, _ = parse({"prompt": "x", "size": "128x128"})
    assert (settings.steps, settings.prior_steps) == (10, None)  # Stable Cascade's defaults: 10, and 20 prior
    engine = Engine(spec.generator(pipe), max_batch=2, max_wait_s=0.05, max_queue=8)
    engine.start()
    assert engine.ready.wait(60) and engine.error is None
    with running(create_app(engine, parse, "stable-cascade")) as (url, _):
        body = {"prompt": "a red circle", "n": 2, "size": "256x128", "seed": 5, **FAST}
        res = httpx.post(url + "/v1/images/generations", json=body, timeout=300)
        assert res.status_code == 200, res.text
        bad = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "size": "64x64"}, timeout=60)
    data = res.json()["data"]
    assert [d["seed"] for d in data] == [5, 6]
    ref = direct(pipe, "a red circle", [5, 6], 128, 256)
    for item, image in zip(data, ref, strict=True):
        assert np.array_equal(decode(item.get("b64_json")), np.asarray(image, np.int16))
    assert bad.status_code == 400 and "not a size this model can make" in bad.json()["error"]["message"]


def latents(pipe):
    """Group A's first line as decoder latents (the pipeline's last array before stage A, which test_sharding.py
    checks sharded on its own): no stage A compile per mesh."""
    call = dict(negative_prompt="blurry", seed=[100, 101], num_images_per_prompt=2, height=128, width=128)
    return pipe("a red circle", prior_num_inference_steps=2, num_inference_steps=2, output_type="latent", **call).images


# dp (each device runs the one-device program on its slice) and tp (XLA-partitioned heads over data × model); fsdp:
# tests/test_cascade_pipeline.py::test_sharded_and_offloaded_equals_one_device
@pytest.mark.parametrize("mode,data,model", [("dp", 2, 1), ("tp", 2, 2)])
def test_sharded_pipeline_equals_one_device(spec, pipe, mode, data, model):
    """The combined pipeline with every stage sharded over a data × model mesh (tp splits the prior's, decoder's
    and text encoders' heads over the 2-way model axis) against one device, in the shapes of group A above."""
    mesh = wj.make_mesh(data=data, model=model, devices=jax.devices()[: data * model])
    sharded = spec.load(dtype=jnp.float32, mesh=mesh, sharding=mode, progress=False)
    prior_q = sharded.prior_pipe.prior.variables["params"]["down_blocks_0_2"]["attention"]["to_q"]["kernel"]
    assert prior_q.sharding.mesh == mesh and (mode != "tp" or prior_q.sharding.spec == P(None, "model"))
    want, got = latents(pipe), latents(sharded)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{mode} on data {data} × model {model} vs one device: max |Δ| / max |x| = {err:.1e}")
    assert got.shape == want.shape == (2, 32, 32, 4) and err < 1e-5


def test_variant_bf16_loads_and_generates(saved, folders, pipe, capsys):
    """Folders saved by diffusers with variant="bf16" (bf16 tensors in `*.bf16.safetensors`, no other weight
    files) load with variant="bf16": the weights are the f32 ones rounded to bf16, and the pipeline runs (the
    f32 pipeline's executables: same shapes, shared compile cache)."""
    import torch

    from wurst_jax.weights import WeightsError

    root, ref = saved
    dec, pri = root / "sc-bf16", root / "sc-prior-bf16"
    ref["decoder"].to(torch.bfloat16).save_pretrained(dec, variant="bf16")
    ref["prior"].to(torch.bfloat16).save_pretrained(pri, variant="bf16")
    assert (dec / "decoder" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    with pytest.raises(WeightsError, match=r"no weights found .*diffusion_pytorch_model.bf16.safetensors .*--variant"):
        wj.StableCascadeDecoderPipeline.from_pretrained(dec, progress=False)
    prior = wj.StableCascadePriorPipeline.from_pretrained(
        pri, variant="bf16", compiler=pipe.prior_pipe.compiler, progress=False
    )
    decoder = wj.StableCascadeDecoderPipeline.from_pretrained(
        dec, variant="bf16", compiler=pipe.decoder_pipe.compiler, progress=False
    )
    pairs = [(prior.prior, pipe.prior_pipe.prior), (decoder.decoder, pipe.decoder_pipe.decoder)]
    pairs += [(decoder.vqgan, pipe.decoder_pipe.vqgan), (prior.text.encoder, pipe.prior_pipe.text.encoder)]
    for ours, full in pairs:
        rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), full.variables)
        assert jax.tree_util.tree_all(
            jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), ours.variables, rounded)
        )
    got, want = latents(wj.StableCascadeCombinedPipeline(prior, decoder)), latents(pipe)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"bf16 variant weights vs f32 weights, decoder latents: max |Δ| / max |x| = {err:.1e}")
    assert np.isfinite(got).all() and 0 < err < 0.05
    assert ModelSpec.from_folders(str(dec), str(pri), variant="bf16").variant == "bf16"
    # the CLI flag reaches the check before any loading: the f32 folders have no bf16 files
    args = ["generate", "x", "--model", str(folders[0]), "--prior", str(folders[1]), "--variant", "bf16"]
    assert cli.main([*args, "--out", str(root / "x.png")]) == 2
    assert "--variant bf16: " in capsys.readouterr().err
