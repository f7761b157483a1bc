"""`wurst-jax serve`: real uvicorn on loopback (in a thread, sharing one loaded tiny pipeline), the `openai` client
and plain httpx; concurrent requests are batched and equal the direct pipeline's images; bad requests get 400, a
full queue 503; a shutdown finishes what is queued; the command itself starts, answers and stops on SIGTERM."""

import base64
import contextlib
import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from wurst_jax import cli
from wurst_jax.serving import ModelSpec, Settings
from wurst_jax.serving.engine import Engine
from wurst_jax.serving.jobs import Defaults
from wurst_jax.serving.server import create_app, parse_generation

uvicorn = pytest.importorskip("uvicorn")
ROOT = Path(__file__).resolve().parent.parent
FAST = {"prior_steps": 3, "steps": 2}
CALL = dict(height=64, width=64, prior_num_inference_steps=3, num_inference_steps=2, decoder_guidance_scale=4.0)


@contextlib.contextmanager
def running(app):
    """uvicorn serving `app` on a free loopback port, in a thread; stopped as a signal would stop it."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.from_folders()


@pytest.fixture(scope="module")
def pipe(spec):
    return spec.load(dtype=jnp.float32, progress=False)


def parser(spec):
    count, limit = spec.token_counter()
    defaults = Defaults(64, 64, decoder_guidance=spec.default_decoder_guidance)
    return lambda body: parse_generation(body, defaults, spec, count, limit)


@pytest.fixture(scope="module")
def served(spec, pipe):
    """The tiny model behind the API: batches of 2, a request waits up to 0.3 s for company."""
    engine = Engine(spec.generator(pipe), max_batch=2, max_wait_s=0.3, max_queue=64)
    engine.start([Settings(64, 64, 3, 4.0, 2, 4.0)])  # compiled before the first request
    assert engine.ready.wait(300) and engine.error is None
    with running(create_app(engine, parser(spec), "tiny")) as (url, _):
        yield url
    engine.stop(60)  # done by the app's shutdown already: returns at once


def decode(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == "PNG"
        return np.asarray(img, np.int16)


def test_openai_client(served, pipe):
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {"seed": 5, **FAST}  # fields beyond OpenAI's go in extra_body
    res = client.images.generate(
        model="tiny", prompt="a red circle", n=2, size="64x64", response_format="b64_json", extra_body=extra
    )
    assert res.created > 0 and len(res.data) == 2
    ref = pipe("a red circle", seed=[5, 6], num_images_per_prompt=2, **CALL).images
    for item, image in zip(res.data, ref, strict=True):
        assert np.abs(decode(item.b64_json) - np.asarray(image, np.int16)).max() <= 1  # text batch rounding


def test_concurrent_requests_are_batched_and_exact(served, pipe):
    shapes = ["circle", "square", "triangle", "star"]
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in shapes] * 2
    before = httpx.get(served + "/metrics").json()

    def ask(i):
        body = {"prompt": prompts[i], "n": 1, "size": "64x64", "seed": 1000 + i, **FAST}
        return httpx.post(served + "/v1/images/generations", json=body, timeout=300)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert [a.status_code for a in answers] == [200] * 32
    after = httpx.get(served + "/metrics").json()
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == 32 and after["images"] - before["images"] == 32
    assert batches < 32 and after["batch_sizes"].get("2", 0) > 0  # served in fewer batches than requests
    assert after["latency_s"]["p95"] >= after["latency_s"]["p50"] > 0 and after["queue_length"] == 0
    got = [decode(a.json()["data"][0]["b64_json"]) for a in answers]
    assert [a.json()["data"][0]["seed"] for a in answers] == [1000 + i for i in range(32)]
    for i in range(0, 32, 2):  # the direct pipeline, two images per call as the server batches them
        ref = pipe(prompts[i : i + 2], seed=[1000 + i, 1001 + i], **CALL).images
        for k in range(2):
            assert np.abs(got[i + k] - np.asarray(ref[k], np.int16)).max() == 0, i + k
    print(f"32 requests in {batches} batches; mean batch {after['batch_size_mean']:.2f}")


BAD = [
    (b"{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"n": 1}, "`prompt` must be a non-empty string"),
    ({"prompt": "x", "n": 0}, "`n` must be an integer from 1 to 10"),
    ({"prompt": "x", "n": 11}, "`n` must be an integer from 1 to 10"),
    ({"prompt": "x", "size": "65x64"}, "width 65 is not a size"),
    ({"prompt": "x", "size": "large"}, "`size` must be 'WIDTHxHEIGHT'"),
    ({"prompt": "word " * 100}, "`prompt` is 102 tokens long"),
    ({"prompt": "x", "response_format": "url"}, "'url' is not supported"),
    ({"prompt": "x", "response_format": "xml"}, "'xml' is not supported"),
    ({"prompt": "x", "quality": "hd"}, "unknown field(s) 'quality'"),
    ({"prompt": "x", "steps": 0}, "`steps` must be an integer from 1"),
    ({"prompt": "x", "seed": "7"}, "`seed` must be an integer"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_requests_get_400(served, body, message):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    res = httpx.post(served + "/v1/images/generations", headers={"content-type": "application/json"}, **kw)
    assert res.status_code == 400
    err = res.json()["error"]
    assert err["type"] == "invalid_request_error" and message in err["message"], err
    assert httpx.get(served + "/health").json()["status"] == "ok"  # still serving


class Held:
    """A generate function that waits until released (a busy model), then returns blank images."""

    def __init__(self):
        self.started, self.release, self.batches = threading.Event(), threading.Event(), []

    def __call__(self, settings, rows):
        self.started.set()
        self.release.wait(60)
        self.batches.append(len(rows))
        return [Image.new("RGB", (settings.width, settings.height)) for _ in rows]


def _wait(url, key, value):
    deadline = time.monotonic() + 30
    while httpx.get(url + "/metrics").json()[key] != value:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_full_queue_gets_503_with_retry_after(spec):
    held = Held()
    engine = Engine(held, max_batch=1, max_wait_s=0.0, max_queue=1)
    engine.start()
    with running(create_app(engine, parser(spec))) as (url, _), ThreadPoolExecutor(2) as pool:
        post = lambda: httpx.post(url + "/v1/images/generations", json={"prompt": "x"}, timeout=60)
        first = pool.submit(post)
        assert held.started.wait(30)  # the worker is busy with the first request
        second = pool.submit(post)
        _wait(url, "queue_length", 1)  # the second waits in the queue, which is now full
        third = post()
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["type"] == "server_busy"
        held.release.set()
        assert first.result().status_code == second.result().status_code == 200
        assert httpx.get(url + "/metrics").json()["rejected"] == 1


def test_shutdown_finishes_what_is_queued(spec):
    held = Held()
    engine = Engine(held, max_batch=2, max_wait_s=0.0, max_queue=8)
    engine.start()
    with ThreadPoolExecutor(3) as pool:
        with running(create_app(engine, parser(spec))) as (url, server):
            post = lambda: httpx.post(url + "/v1/images/generations", json={"prompt": "x"}, timeout=60)
            futures = [pool.submit(post)]
            assert held.started.wait(30)  # the first is running; two more wait
            futures += [pool.submit(post) for _ in range(2)]
            _wait(url, "rows_waiting", 2)
            server.should_exit = True  # what SIGTERM / SIGINT do
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(url + "/health")
            held.release.set()
        assert [f.result().status_code for f in futures] == [200] * 3
    assert engine.metrics()["batch_sizes"] == {"1": 1, "2": 1}  # the running request, then the two queued
    assert not engine._thread.is_alive()


def test_serve_command_starts_answers_and_stops_on_sigterm():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "wurst_jax.cli", "serve", "--port", "0", "--dtype", "float32", "--quiet"]
    p = subprocess.Popen(cmd, env={**env, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stderr], daemon=True).start()
    try:
        line = ""
        while "listening on" not in line:
            line = lines.get(timeout=120)
        url = line.split("listening on ")[1].split()[0]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        res = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "size": "40x40"})
        assert res.status_code == 400 and "sizes that work: 16, 32, 48, 64" in res.json()["error"]["message"]
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        while "stopped;" not in line:
            line = lines.get(timeout=10)
        assert "stopped; 0 requests" in line
    finally:
        p.kill()


def test_serve_refuses_bad_options_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(ModelSpec, "load", lambda *a, **k: pytest.fail("weights were loaded"))
    assert cli.main(["serve", "--warmup", "64x64,64x40"]) == 2
    assert "--warmup 64x40: height 40 is not a size" in capsys.readouterr().err


def test_a_failed_batch_gets_500_and_the_server_goes_on(spec):
    def flaky(settings, rows):
        if rows[0].prompt == "boom":
            raise RuntimeError("out of memory")
        return [Image.new("RGB", (settings.width, settings.height)) for _ in rows]

    engine = Engine(flaky, max_batch=1, max_wait_s=0.0)
    engine.start()
    with running(create_app(engine, parser(spec))) as (url, _):
        res = httpx.post(url + "/v1/images/generations", json={"prompt": "boom"}, timeout=30)
        assert res.status_code == 500 and "out of memory" in res.json()["error"]["message"]
        res = httpx.post(url + "/v1/images/generations", json={"prompt": "fine", "n": 2}, timeout=30)
        assert res.status_code == 200 and len(res.json()["data"]) == 2
        assert httpx.get(url + "/metrics").json()["failed_batches"] == 1
