"""`wurst-jax generate --prompts FILE --out-dir DIR` on the shipped tiny model: every image equals the one-image
pipeline call bit for bit, on one device, on 8 devices and on 2 processes (data parallel runs the one-device program
on every device: one image per device here); a run stopped by SIGTERM or killed resumes; bad lines are refused
before any weights load. One pipeline is loaded per module and every run has one image per device (few compiles)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import wurst_jax as wj
from wurst_jax import cli
from wurst_jax.serving import ModelSpec, batch, jobs

ROOT = Path(__file__).resolve().parent.parent
FAST = {"prior_steps": 3, "steps": 2}  # few steps: compile time is the same, run time small
# Two images per line (a line's seeds follow each other); padding is exercised on 8 devices (6 images in a batch
# of 8). Group A: 64×64 with the tiny model's guidance.
LINES_A = [
    {"prompt": "a red circle on a blue background", "num_images": 2},
    {"prompt": "a green square", "num_images": 2, "seed": 7, "id": "sq"},
    {"prompt": "a (yellow)1.3 triangle", "negative_prompt": "blue", "num_images": 2},
]
# group B: 64×128, other guidance (2 images: one batch)
LINES_B = [{"prompt": "a blue circle", "num_images": 2, "seed": 3, "width": 128, "prior_guidance": 2.0}]
LINES_B[0]["decoder_guidance"] = 0.0


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img, np.int16)


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.from_folders()


@pytest.fixture(scope="module")
def pipe(spec):
    return spec.load(dtype=jnp.float32, progress=False)


def defaults(spec, **kw):
    return jobs.Defaults(spec.default_size, spec.default_size, decoder_guidance=spec.default_decoder_guidance, **kw)


@pytest.fixture(scope="module")
def single(spec, pipe, tmp_path_factory):
    """The mixed file made on one device in batches of 1 (the default): (jobs, out_dir)."""
    root = tmp_path_factory.mktemp("single")
    file = write_jsonl(root / "prompts.jsonl", [{**x, **FAST} for x in LINES_A + LINES_B])
    todo = jobs.parse_prompt_file(file, defaults(spec, seed=100), spec)
    made_with = {"model": spec.provenance(), "dtype": "float32"}
    summary = batch.run_plan(spec.generator(pipe), todo, root / "out", 1, made_with, show=False)
    assert summary.images == 8 and not summary.stopped
    return todo, root / "out"


def by_key(out_dir: Path) -> dict:
    """(prompt, seed, width) → pixels of every image results.jsonl lists."""
    recs = [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines()]
    return {(r["prompt"], r["seed"], r["width"]): pixels(out_dir / r["file"]) for r in recs}


def test_prompt_file_equals_one_pipeline_call_per_image(single, pipe):
    todo, out = single
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["file"] for r in recs] == [j.file for j in todo]  # each image listed once, in plan order
    assert [r["file"] for r in recs[:4]] == ["00001_0.png", "00001_1.png", "sq_0.png", "sq_1.png"]
    assert [r["seed"] for r in recs] == [100, 101, 7, 8, 104, 105, 3, 4]  # --seed + images before; seed + k
    assert {r["batch_size"] for r in recs} == {1} and recs[0]["model"]["decoder_digest"]
    diffs = {}
    for line in LINES_A + LINES_B:
        for r in [r for r in recs if r["prompt"] == line["prompt"]]:
            got = pixels(out / r["file"])
            assert got.shape == (64, line.get("width", 64), 3)
            diffs[r["file"]] = np.abs(got - np.asarray(one_image(pipe, line, r["seed"]), np.int16))
    print("batched vs one call per image, uint8 values that differ (max |Δ|):")
    print(", ".join(f"{f}: {int((d > 0).sum())} ({d.max()})" for f, d in diffs.items()))
    assert all(d.max() == 0 for d in diffs.values())


def one_image(pipe, line: dict, seed: int):
    """The image of `line` with `seed` from one pipeline call (a seed list: the key the batch gives the image)."""
    return pipe(
        line["prompt"],
        negative_prompt=line.get("negative_prompt"),
        seed=[seed],
        height=64,
        width=line.get("width", 64),
        prior_num_inference_steps=3,
        prior_guidance_scale=line.get("prior_guidance", 4.0),
        num_inference_steps=2,
        decoder_guidance_scale=line.get("decoder_guidance", 4.0),
    ).images[0]


def test_eight_devices_equal_one(single, spec):
    todo, out = single
    mesh = wj.make_mesh(data=8)
    pipe8 = spec.load(dtype=jnp.float32, mesh=mesh, sharding="dp", progress=False)
    group_a = [j for j in todo if j.settings == todo[0].settings]
    out8 = out.parent / "out8"
    batch.run_plan(spec.generator(pipe8), group_a, out8, 8, {"model": {}, "dtype": "float32"}, show=False)
    ref, got = by_key(out), by_key(out8)
    assert len(got) == 6
    assert all(np.array_equal(got[k], ref[k]) for k in got)  # bit-equal: each device runs the one-device program


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli_env(devices: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }


def _two_processes(cmd: list, args: list, results: Path, sigterm_after: int | None = None) -> list:
    """The command as processes 0 and 1 of a loopback jax.distributed run (1 CPU device each); with
    `sigterm_after`, process 1 alone gets SIGTERM once results.jsonl has that many lines. Returns their outputs."""
    port = _free_port()
    multi = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
    procs = [
        subprocess.Popen(
            [*cmd, *args, *multi, str(pid)], env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for pid in range(2)
    ]
    if sigterm_after is not None:
        deadline = time.monotonic() + 300
        while len(_lines(results)) < sigterm_after and procs[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    return [subprocess.CompletedProcess(p.args, p.wait(600), p.communicate()[0], "") for p in procs]


def test_two_processes_stop_together_and_equal_one_device(single, tmp_path):
    """2 processes, batches of 2 spanning both: SIGTERM to process 1 alone (JAX's preemption notice) stops both
    before the same batch (exit 143); the rerun completes, and the images equal the single-device run's bit for
    bit."""
    _, out = single
    more = [{"prompt": f"a blue circle {i}", "num_images": 2} for i in range(3)]
    file = write_jsonl(tmp_path / "a.jsonl", [{**x, **FAST} for x in LINES_A + more])  # 12 images, 6 batches
    res = tmp_path / "out" / "results.jsonl"
    args = ["generate", "--prompts", str(file), "--out-dir", str(tmp_path / "out"), "--dtype", "float32"]
    args += ["--seed", "100", "--quiet", "--cache-dir", str(tmp_path / "cache")]

    runs = _two_processes([sys.executable, "-c", SLOW], args, res, sigterm_after=2)
    assert [r.returncode for r in runs] == [143, 143], "\n".join(r.stdout[-3000:] for r in runs)
    stopped = len(_lines(res))
    assert all(f"{stopped} of 12 images" in r.stdout for r in runs) and 4 <= stopped <= 8

    runs = _two_processes([sys.executable, "-m", "wurst_jax.cli"], args, res)
    assert [r.returncode for r in runs] == [0, 0], "\n".join(r.stdout[-3000:] for r in runs)
    recs = [json.loads(x) for x in _lines(res)]
    assert sorted(r["file"] for r in recs) == sorted({r["file"] for r in recs}) and len(recs) == 12
    assert {r["batch_size"] for r in recs} == {2}  # one device per process: each batch spans both hosts
    got, ref = by_key(tmp_path / "out"), by_key(out)
    assert all(np.array_equal(got[k], ref[k]) for k in ref if k[0] in {x["prompt"] for x in LINES_A})


SLOW = """import sys, time
import wurst_jax.serving.backend as b
make = b.generate_images
def slow(*a, **k):
    time.sleep(0.5)  # hold each batch, so that a signal lands inside one
    return make(*a, **k)
b.generate_images = slow
from wurst_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _run_until(cmd: list, results: Path, lines: int, sig: int) -> subprocess.CompletedProcess:
    """Start the command; 0.2 s after results.jsonl has `lines` lines (inside the next batch, which is held 0.5 s),
    send `sig`; return what it did."""
    p = subprocess.Popen(cmd, env=cli_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(_lines(results)) < lines and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def test_sigterm_then_sigkill_then_rerun(single, tmp_path):
    """Batches of 1 (6 of them, each held 0.5 s): SIGTERM after the first is listed finishes the second and exits
    143; a SIGKILL after the third is listed loses at most the one in flight; the rerun completes the rest."""
    _, out = single
    file = write_jsonl(tmp_path / "a.jsonl", [{**x, **FAST} for x in LINES_A])
    res = tmp_path / "out" / "results.jsonl"
    args = ["generate", "--prompts", str(file), "--out-dir", str(tmp_path / "out"), "--dtype", "float32"]
    args += ["--seed", "100", "--batch-size", "1", "--cache-dir", str(tmp_path / "cache")]
    cmd = [sys.executable, "-c", SLOW, *args]

    p = _run_until(cmd, res, 1, signal.SIGTERM)
    assert p.returncode == 143, p.stderr[-3000:]
    assert "rerun the same command" in p.stderr and "2 of 6 images" in p.stderr
    assert len(_lines(res)) == 2  # the batch in flight was finished and written

    p = _run_until(cmd, res, 3, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    killed = len(_lines(res))
    assert 3 <= killed <= 4

    p = subprocess.run([sys.executable, "-m", "wurst_jax.cli", *args], env=cli_env(1), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{6 - killed} images in" in p.stderr and f"{killed} already there" in p.stderr
    recs = [json.loads(x) for x in _lines(res)]
    files = [r["file"] for r in recs]
    assert sorted(files) == sorted(f"{s}_{k}.png" for s in ("00001", "sq", "00003") for k in (0, 1))
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*files, ".lock", "results.jsonl"])  # no temporaries
    got, ref = by_key(tmp_path / "out"), by_key(out)
    assert all(np.array_equal(got[k], ref[k]) for k in got)  # the CLI's images are the in-process run's


BAD = [
    ("txt", ["a cat", "", "\xff"], 3, "not UTF-8"),
    ("jsonl", ['{"prompt": "a"}', "{oops"], 2, "not valid JSON"),
    ("jsonl", ['["a"]'], 1, "expected a JSON object"),
    ("jsonl", ['{"prompt": "a", "colour": 1}'], 1, "unknown key(s) 'colour'"),
    ("jsonl", ['{"seed": 1}'], 1, "missing `prompt`"),
    ("jsonl", ['{"prompt": ""}'], 1, "`prompt` must be a non-empty string"),
    ("jsonl", ['{"prompt": "a"}', '{"prompt": "a", "height": 40}'], 2, "height 40 is not a size"),
    ("jsonl", ['{"prompt": "a", "width": 64.0}'], 1, "`width` must be an integer"),
    ("jsonl", ['{"prompt": "a", "seed": -1}'], 1, "`seed` must be an integer from 0"),
    ("jsonl", ['{"prompt": "a", "num_images": 0}'], 1, "`num_images` must be an integer from 1"),
    ("jsonl", ['{"prompt": "a", "steps": true}'], 1, "`steps` must be an integer"),
    ("jsonl", ['{"prompt": "a", "prior_guidance": -1}'], 1, "`prior_guidance` must be a finite number"),
    ("jsonl", ['{"prompt": "a", "negative_prompt": 3}'], 1, "`negative_prompt` must be a string"),
    ("jsonl", ['{"prompt": "a", "id": "../x"}'], 1, "`id` must be"),
    ("jsonl", ['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], 2, "x_0.png is already used by line 1"),
]


@pytest.mark.parametrize("suffix,lines,line,message", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_lines_are_refused_before_loading(monkeypatch, capsys, tmp_path, suffix, lines, line, message):
    def no_loading(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(ModelSpec, "load", no_loading)
    file = tmp_path / f"prompts.{suffix}"
    file.write_bytes("\n".join(lines).encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    rc = cli.main(["generate", "--prompts", str(file), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"wurst-jax generate: error: {file}:{line}: ") and message in err[0], err[0]
    assert not (tmp_path / "out").exists()


class FakeImages:
    """A generate function without a model: one solid image per row, its colour from the seed."""

    def __init__(self):
        self.calls = []

    def __call__(self, settings, rows):
        self.calls.append(len(rows))
        return [Image.new("RGB", (settings.width, settings.height), (r.seed % 256, 0, 0)) for r in rows]


def test_resume_tolerates_a_torn_line_and_refuses_other_settings(spec, tmp_path):
    file = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", **FAST} for i in range(5)])
    todo = jobs.parse_prompt_file(file, defaults(spec), spec)
    out, made_with = tmp_path / "out", {"model": spec.provenance(), "dtype": "float32"}
    gen = FakeImages()
    batch.run_plan(gen, todo[:3], out, 2, made_with, show=False)
    assert gen.calls == [2, 2]  # 3 images: the second batch padded to 2
    res = out / "results.jsonl"
    res.write_bytes(res.read_bytes() + b'{"file": "00004_0.png", "pro')  # a crash while appending
    (out / "00002_0.png").unlink()  # an image deleted by hand is made again
    done = jobs.done_mask(todo, jobs.load_results(out), made_with)
    assert done == [True, False, True, False, False]
    batch.run_plan(gen, [j for j, d in zip(todo, done, strict=True) if not d], out, 2, made_with, show=False)
    recs = [json.loads(x) for x in res.read_text().splitlines()]
    assert sorted(r["file"] for r in recs) == [j.file for j in todo]
    changed = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"p{i}", "prior_steps": 3, "steps": 4} for i in range(5)])
    with pytest.raises(ValueError, match="00001_0.png in the output folder was made with another steps"):
        jobs.done_mask(jobs.parse_prompt_file(changed, defaults(spec), spec), jobs.load_results(out), made_with)
    res.write_text("{}\n" + res.read_text())  # damage before the last line is not a crash: refused
    with pytest.raises(ValueError, match=r"results.jsonl:1: unreadable"):
        jobs.load_results(out)


def test_sizes_the_spec_accepts_are_those_the_pipeline_accepts(spec, pipe):
    for size in range(8, 200, 4):
        try:
            spec.check_size(size, 64)
            ok = True
        except ValueError:
            ok = False
        with pytest.raises(ValueError) as e:  # a bad seed is checked right after the size: nothing runs
            pipe("x", height=size, width=64, seed="not a seed")
        assert ("seed" in str(e.value)) == ok, (size, str(e.value))


def test_txt_prompts_take_the_command_defaults(spec, tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("a red circle\n\n  a blue square  \n")
    todo = jobs.parse_prompt_file(file, defaults(spec, seed=5, num_images=2, steps=3), spec)
    assert [(j.file, j.row.prompt, j.row.seed, j.settings.steps) for j in todo] == [
        ("00001_0.png", "a red circle", 5, 3),
        ("00001_1.png", "a red circle", 6, 3),
        ("00003_0.png", "a blue square", 7, 3),
        ("00003_1.png", "a blue square", 8, 3),
    ]
    assert [len(b) for _, b in jobs.plan_batches(todo, 3)] == [3, 1]
    assert jobs.padded_rows(jobs.plan_batches(todo, 3)[1][1], 3) == [todo[3].row] * 3
