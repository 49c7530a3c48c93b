"""The inference server, started as a user starts it, answering real HTTP requests on 127.0.0.1:
good ones with the artifact's own predictions, bad ones with a 4xx and a message, 64 concurrent
ones each with its own answer; a model error is a 500 and the server goes on."""
import asyncio
import contextlib
import http.client
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageFile

from fnlearn import export, models
from fnlearn.serve import app as app_module
from fnlearn.serve import make_app
from fnlearn.serve.app import top_k

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAX_BODY = 40_000  # bytes: two 32x32 images as JSON fit, 60 kB does not


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, content_type=None):
    """`(status, decoded JSON body)` of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def wait_until_up(port, process=None, log=None, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited: {log.read()}")
        try:
            if request(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def artifact_path(tmp_path_factory):
    model = models.get("fastnet_tiny")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = {**variables, "params": jax.tree.map(lambda a: 30 * a, variables["params"])}  # confident logits
    path = tmp_path_factory.mktemp("serve") / "model.zip"
    export.save(path, export.classifier(model.apply, variables, (0.5,) * 3, (0.25,) * 3), (32, 32, 3),
                {"labels": LABELS, "model": "fastnet_tiny"})
    return path


@pytest.fixture(scope="module")
def server(artifact_path):
    """`python -m fnlearn.serve` in its own process; yields (port, the loaded artifact)."""
    port = free_port()
    log = open(artifact_path.with_name("server.log"), "w+")  # a file: a pipe nobody reads could fill and block
    process = subprocess.Popen([sys.executable, "-m", "fnlearn.serve", "--artifact", str(artifact_path),
                                "--port", str(port), "--max-batch", "16", "--max-body-mb", str(MAX_BODY / 2**20),
                                "--max-image-mp", "0.002"],
                               stdout=log, stderr=log, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        wait_until_up(port, process, log)
        yield port, export.load(artifact_path)
        assert process.poll() is None, "the server died"
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def expected(artifact, pixels, k):
    return top_k(artifact(pixels), LABELS, k)


def assert_same_predictions(got, want):
    assert [[p["label"] for p in image] for image in got] == [[p["label"] for p in image] for image in want]
    np.testing.assert_allclose([[p["prob"] for p in image] for image in got],
                               [[p["prob"] for p in image] for image in want], atol=1e-5)


def test_good_requests_get_the_artifacts_predictions(server):
    port, artifact = server
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    status, body = request(port, "POST", "/predict?k=3", png(pixels[0]), "image/png")
    assert status == 200
    assert_same_predictions(body["predictions"], expected(artifact, pixels[:1], 3))
    status, body = request(port, "POST", "/predict", json.dumps({"inputs": pixels.tolist()}), "application/json")
    assert status == 200 and len(body["predictions"]) == 2 and all(len(p) == 5 for p in body["predictions"])
    assert_same_predictions(body["predictions"], expected(artifact, pixels, 5))
    # A JPEG of another size is resized to 32x32 (bilinear), as PIL does it here.
    large = rng.integers(0, 256, (48, 40, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(large).save(buffer, "JPEG")
    resized = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((32, 32), Image.BILINEAR))
    status, body = request(port, "POST", "/predict?k=10", buffer.getvalue(), "image/jpeg")
    assert status == 200
    assert_same_predictions(body["predictions"], expected(artifact, resized[None], 10))
    assert sum(p["prob"] for p in body["predictions"][0]) == pytest.approx(1, abs=1e-6)
    status, body = request(port, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["labels"] == LABELS


@pytest.mark.parametrize("method, path, body, content_type, status, message", [
    ("POST", "/predict", b"this is no image", "image/png", 400, "not an image"),
    ("POST", "/predict", b'{"inputs": [1, 2', "application/json", 400, "malformed JSON"),
    ("POST", "/predict", json.dumps({"inputs": np.zeros((2, 31, 32, 3), int).tolist()}), "application/json", 422,
     "has shape (2, 31, 32, 3); expected (N, 32, 32, 3)"),
    ("POST", "/predict", json.dumps({"inputs": [[1, 2], [3]]}), "application/json", 422, "nested list of numbers"),
    ("POST", "/predict", json.dumps({"inputs": np.full((32, 32, 3), "7").tolist()}), "application/json", 422,
     "nested list of numbers"),  # strings, which NumPy would read as numbers
    ("POST", "/predict", json.dumps({"inputs": np.full((32, 32, 3), True).tolist()}), "application/json", 422,
     "nested list of numbers"),
    ("POST", "/predict", json.dumps({"inputs": np.full((32, 32, 3), 0.5).tolist()}), "application/json", 422,
     "whole numbers 0..255"),
    ("POST", "/predict", json.dumps({"images": []}), "application/json", 422, '{"inputs": [...]}'),
    ("POST", "/predict", b"x" * 60_000, "image/png", 413, "over the limit"),
    ("POST", "/predict?k=11", png(np.zeros((32, 32, 3), np.uint8)), "image/png", 400, "k='11'"),
    ("POST", "/predict", png(np.zeros((40, 60, 3), np.uint8)), "image/png", 413,
     "image of 60x40 pixels is over the server's limit of 0.002 megapixels (--max-image-mp)"),
    ("POST", "/predict?k=%C2%B2", png(np.zeros((32, 32, 3), np.uint8)), "image/png", 400, "k='²'"),
    ("POST", "/predict", "[" * 10_000 + "]" * 10_000, "application/json", 400, "nested too deeply"),
    ("POST", "/predict", '{"inputs": [10' + "0" * 400 + "]}", "application/json", 422, "nested list of numbers"),
    ("POST", "/predict", '{"inputs": ' + json.dumps([[[0] * 3] * 32] * 32).replace("0", "1e400", 1) + "}",
     "application/json", 422, "whole numbers 0..255"),  # inf, in an image of the right shape
    ("POST", "/predict", b"hello", "text/plain", 415, "Content-Type text/plain"),
    ("GET", "/predict", None, None, 405, "GET /predict"),
    ("GET", "/nowhere", None, None, 404, "GET /nowhere"),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_goes_on(server, method, path, body,
                                                                          content_type, status, message):
    port, _ = server
    got, answer = request(port, method, path, body, content_type)
    assert got == status and message in answer["error"]
    assert request(port, "GET", "/health")[0] == 200


def test_a_chunked_body_past_the_limit_and_json_without_a_content_type(server):
    port, artifact = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/predict", body=iter([b"x" * 30_000] * 2), encode_chunked=True,
                       headers={"Content-Type": "image/png"})  # no Content-Length to refuse it by
    response = connection.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    connection.close()
    pixels = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), np.uint8)
    status, body = request(port, "POST", "/predict?k=1", json.dumps({"inputs": pixels.tolist()}))
    assert status == 200
    assert_same_predictions(body["predictions"], expected(artifact, pixels, 1))


def test_a_method_not_allowed_names_the_allowed_one(server):
    port, _ = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/predict")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    connection.close()


def test_an_image_with_too_many_pixels_is_refused_before_it_is_decoded(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the image was decoded"))
    with pytest.raises(app_module.RequestError, match="50x50 pixels is over") as error:
        app_module.decode_image(png(np.zeros((50, 50, 3), np.uint8)), (32, 32, 3), max_pixels=2499)
    assert error.value.status == 413


def test_16_bit_images_keep_their_levels_and_float_ones_are_refused():
    levels = np.array([[0, 64 << 8, 128 << 8, 255 << 8]], np.uint16).repeat(4, 0)
    encoded = io.BytesIO()
    Image.fromarray(levels).save(encoded, format="PNG")  # opens as mode I;16
    decoded = app_module.decode_image(encoded.getvalue(), (4, 4, 1))
    np.testing.assert_array_equal(decoded[0, ..., 0], levels >> 8)
    encoded = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(encoded, format="TIFF")  # mode F
    with pytest.raises(app_module.RequestError, match="F-mode images") as error:
        app_module.decode_image(encoded.getvalue(), (4, 4, 1))
    assert error.value.status == 415


def test_a_caller_that_hangs_up_mid_body_is_no_server_error(artifact_path, caplog):
    with serving(make_app(export.load(artifact_path))) as port:
        with socket.create_connection(("127.0.0.1", port)) as caller:
            caller.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
        deadline = time.time() + 10
        while (counts := request(port, "GET", "/metrics")[1]["requests"]["by_route"].get("/predict")) is None:
            assert time.time() < deadline, "the hang-up was never counted"
            time.sleep(0.1)
        assert "500" not in counts and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_64_concurrent_callers_each_get_their_own_answer(server):
    port, artifact = server
    pixels = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), np.uint8)
    before = request(port, "GET", "/metrics")[1]

    def call(i):  # half send PNG files, half JSON
        if i % 2:
            return request(port, "POST", "/predict?k=2", png(pixels[i]), "image/png")
        return request(port, "POST", "/predict?k=2", json.dumps({"inputs": pixels[i].tolist()}), "application/json")

    barrier = threading.Barrier(64)
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda i: (barrier.wait(), call(i))[1], range(64)))
    want = expected(artifact, pixels, 2)
    for i, (status, body) in enumerate(answers):
        assert status == 200
        assert_same_predictions(body["predictions"], want[i:i + 1])
    after = request(port, "GET", "/metrics")[1]
    ok = [m["requests"]["by_route"].get("/predict", {}).get("200", 0) for m in (before, after)]
    assert ok[1] - ok[0] == 64
    latency = after["predict_latency_ms"]
    assert latency["count"] >= 64 and 0 < latency["p50"] <= latency["p99"]


@contextlib.contextmanager
def serving(app):
    """`app` under uvicorn in a thread of this process, on a free port; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_up(port)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_requests_that_wait_together_share_one_model_call(artifact_path):
    artifact = export.load(artifact_path)
    release, batches = threading.Event(), []

    def held(images):  # the first call waits until the test has queued the others behind it
        batches.append(len(images))
        if len(batches) == 1:
            assert release.wait(60)
        return artifact(images)

    image = png(np.zeros((32, 32, 3), np.uint8))
    with serving(make_app(artifact, held, max_batch=16, max_wait=0)) as port, ThreadPoolExecutor(8) as pool:
        first = pool.submit(request, port, "POST", "/predict", image, "image/png")
        while not batches:
            time.sleep(0.01)
        rest = [pool.submit(request, port, "POST", "/predict", image, "image/png") for _ in range(7)]
        while request(port, "GET", "/metrics")[1]["batches"]["queued_requests"] < 7:
            time.sleep(0.01)
        release.set()
        assert [f.result()[0] for f in [first, *rest]] == [200] * 8
    assert batches == [1, 7]


def test_the_batcher_drops_callers_that_gave_up_before_the_model_saw_them():
    release, batches = threading.Event(), []

    def predict(images):  # the first call waits until two callers have given up behind it
        batches.append(len(images))
        if len(batches) == 1:
            assert release.wait(30)
        return images

    async def callers():
        batcher = app_module.Batcher(predict, max_batch=1, max_wait=0)
        running = asyncio.create_task(batcher.run())
        first = asyncio.create_task(batcher(np.zeros((1, 2))))
        while not batches:
            await asyncio.sleep(0.01)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher(np.ones((1, 2))), 0.05)
        last = asyncio.create_task(batcher(np.full((1, 2), 2.0)))
        release.set()
        answers = float((await first)[0, 0]), float((await last)[0, 0])
        running.cancel()
        return answers

    assert asyncio.run(callers()) == (0.0, 2.0)
    assert batches == [1, 1]  # the two that gave up never reached the model


def test_a_model_error_is_a_500_that_is_logged_and_the_server_goes_on(artifact_path, caplog):
    artifact = export.load(artifact_path)
    calls = []

    def flaky(images):  # fails on its first batch only
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return artifact(images)

    with serving(make_app(artifact, flaky)) as port:
        image = png(np.zeros((32, 32, 3), np.uint8))
        status, body = request(port, "POST", "/predict", image, "image/png")
        assert status == 500 and "internal error" in body["error"]
        logged = [r for r in caplog.records if r.exc_info and "injected failure" in str(r.exc_info[1])]
        assert len(logged) == 1  # logged once, with its cause
        assert request(port, "POST", "/predict", image, "image/png")[0] == 200
        assert request(port, "GET", "/health")[0] == 200


def test_callers_past_the_concurrency_limit_get_a_503(artifact_path):
    artifact = export.load(artifact_path)
    started = threading.Event()

    def slow(images):
        started.set()
        time.sleep(1.0)
        return artifact(images)

    with serving(make_app(artifact, slow, max_concurrency=1)) as port, ThreadPoolExecutor(1) as pool:
        image = png(np.zeros((32, 32, 3), np.uint8))
        first = pool.submit(request, port, "POST", "/predict", image, "image/png")
        assert started.wait(30)
        status, body = request(port, "POST", "/predict", image, "image/png")
        assert status == 503 and "busy" in body["error"]
        assert first.result()[0] == 200


def test_an_artifact_whose_labels_do_not_fit_its_logits_is_refused_at_start(artifact_path, tmp_path, monkeypatch):
    import zipfile

    from fnlearn.serve.__main__ import main

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # were it accepted: return, not serve
    bad = tmp_path / "bad.zip"  # written by hand: export.save refuses such labels
    with zipfile.ZipFile(artifact_path) as source, zipfile.ZipFile(bad, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "meta.json":
                data = json.dumps({**json.loads(data), "labels": ["cat", "dog"]}).encode()
            target.writestr(name, data)
    with pytest.raises(SystemExit, match="has 2 labels for 10 logits"):
        main(["--artifact", str(bad), "--max-batch", "1"])
