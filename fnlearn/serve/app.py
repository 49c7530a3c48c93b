"""The inference server's ASGI app (Starlette): batching across callers, limits, metrics.

    POST /predict?k=5   an image (PNG/JPEG/... body) or JSON {"inputs": [...]} of uint8 pixels
                        -> {"predictions": [[{"label", "prob"}, ...], ...]}, one top-k list an image
    GET  /health        {"status": "ok", "model", "input_shape", "labels"}
    GET  /metrics       request counts by route and status, latency quantiles, batch sizes

Concurrent requests share calls of the model of up to `max_batch` images: the requests
already queued join a batch at once, and a batch waits at most `max_wait` seconds for more.
The model runs in one worker thread, so the event loop keeps answering meanwhile. An image of another size is resized to the model's (bilinear, as
TorchServe's image handlers do); a JSON array of another shape is refused. Every refusal
is answered with `{"error": message}`: a 4xx for a bad request, 503 while the server is
full and 504 when the model takes too long; an error inside the model is logged and
answered with a 500, and the server goes on serving.
"""
import asyncio
import collections
import concurrent.futures
import contextlib
import io
import json
import logging
import time

import numpy as np
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger("fnlearn.serve")

MAX_PIXELS = 16_800_000  # make_app's default: about 4096 x 4096


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the message the caller gets."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def bucketed(artifact, max_batch):
    """`predict(images) -> logits` that calls `artifact` on batches padded to a power of two (at most
    `max_batch`), in chunks of `max_batch`: a compiled artifact then compiles a few shapes, once."""
    sizes = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})

    def predict(images):
        out = []
        for start in range(0, len(images), max_batch):
            chunk = images[start:start + max_batch]
            size = next(s for s in sizes if s >= len(chunk))
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(artifact(padded)[:len(chunk)])
        return np.concatenate(out)

    predict.sizes = sizes
    return predict


class Batcher:
    """Gathers the images of concurrent requests into batches for one model thread."""

    def __init__(self, predict, max_batch, max_wait):
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait
        self.queue = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batch_sizes = collections.deque(maxlen=10_000)

    async def __call__(self, images):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            # A caller that timed out has cancelled its future: its images would only delay the others.
            item = await self.queue.get()
            if item[1].done():
                continue
            items, count, deadline = [item], len(item[0]), loop.time() + self.max_wait
            while count < self.max_batch:  # what already waits joins at once; then wait up to max_wait
                if self.queue.empty():
                    try:
                        item = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                else:
                    item = self.queue.get_nowait()
                if not item[1].done():
                    items.append(item)
                    count += len(item[0])
            self.batch_sizes.append(count)
            try:
                logits = await loop.run_in_executor(self.executor, self.predict,
                                                    np.concatenate([images for images, _ in items]))
            except Exception:  # logged once here; each caller gets a 500; the batcher goes on
                logger.exception("the model failed on a batch of %d images", count)
                for _, future in items:
                    if not future.done():
                        future.set_exception(ModelError())
                continue
            start = 0
            for images, future in items:
                if not future.done():  # a caller that went away has cancelled its future
                    future.set_result(logits[start:start + len(images)])
                start += len(images)


class ModelError(RuntimeError):
    """The model failed on a batch (the server log has the cause)."""


class Metrics:
    """Request counts by route and status, and the latency of the last 10,000 predictions."""

    def __init__(self):
        self.counts = collections.Counter()
        self.latencies = collections.deque(maxlen=10_000)

    def record(self, path, status, seconds):
        self.counts[(path, status)] += 1
        if path == "/predict" and status == 200:
            self.latencies.append(seconds)

    def report(self, batch_sizes, queued):
        by_route = collections.defaultdict(dict)
        for (path, status), n in sorted(self.counts.items()):
            by_route[path][str(status)] = n
        latencies = np.array(self.latencies) * 1000
        quantiles = {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)} if len(latencies) else {}
        return {"requests": {"total": sum(self.counts.values()), "by_route": by_route},
                "predict_latency_ms": {"count": len(latencies), **quantiles},
                "batches": {"count": len(batch_sizes),
                            "mean_images": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
                            "queued_requests": queued}}


class _Measured:
    """ASGI middleware that records each HTTP request's route, status and time in `metrics`."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send=sending)
        finally:
            known = scope["path"] in ("/predict", "/health", "/metrics")
            self.metrics.record(scope["path"] if known else "other", status, time.perf_counter() - start)


async def _body(request, limit):
    """The request body, refused with a 413 as soon as it passes `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"body of {int(length)} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(body, input_shape, max_pixels=MAX_PIXELS):
    """An encoded image as a (1, H, W, C) uint8 batch, resized to the model's H x W; one of more
    than `max_pixels` is refused from its header, before it is decoded."""
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise RequestError(415, f"this model takes {channels}-channel inputs, which no image file holds: send "
                                f"JSON {{\"inputs\": [...]}}")
    try:
        image = Image.open(io.BytesIO(body))
        if image.width * image.height > max_pixels:
            raise RequestError(413, f"image of {image.width}x{image.height} pixels is over the server's limit of "
                                    f"{max_pixels / 1e6:g} megapixels (--max-image-mp)")
        image = ImageOps.exif_transpose(image)  # as a viewer shows it
        if image.mode.startswith("I;16"):  # 16-bit levels: convert() would clip them at 255
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
        elif image.mode in ("I", "F"):
            raise RequestError(415, f"{image.mode}-mode images (32-bit integer or float pixels) have no fixed "
                                    "range: send an 8- or 16-bit image")
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, np.uint8)
    except RequestError:
        raise
    except Exception as e:  # PIL raises many types for data it cannot read
        raise RequestError(400, f"the body is not an image PIL can read ({type(e).__name__}); send a PNG or "
                                f"JPEG file, or JSON {{\"inputs\": [...]}} with Content-Type: application/json")
    return pixels.reshape(1, height, width, channels)


def decode_json(body, input_shape):
    """JSON `{"inputs": [...]}` of pixel values 0-255, one image (H, W, C) or a batch (N, H, W, C)."""
    expected = f"(N, {', '.join(map(str, input_shape))}) or ({', '.join(map(str, input_shape))})"
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON: {e}")
    except RecursionError:
        raise RequestError(400, "JSON nested too deeply")
    if not isinstance(data, dict) or "inputs" not in data:
        raise RequestError(422, f'expected a JSON object {{"inputs": [...]}} holding pixels of shape {expected}')
    try:
        pixels = np.asarray(data["inputs"])  # no dtype: "7" and true would pass as numbers
    except (ValueError, TypeError, OverflowError, RecursionError):
        pixels = None
    if pixels is None or pixels.dtype.kind not in "iuf":
        raise RequestError(422, f'"inputs" must be a nested list of numbers of shape {expected}')
    pixels = pixels.astype(np.float64)
    if pixels.shape == tuple(input_shape):
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[1:] != tuple(input_shape) or len(pixels) == 0:
        raise RequestError(422, f'"inputs" has shape {pixels.shape}; expected {expected}')
    if not np.all((pixels >= 0) & (pixels <= 255) & (pixels == np.round(pixels))):
        raise RequestError(422, '"inputs" must hold whole numbers 0..255 (uint8 pixels, not normalised values)')
    return pixels.astype(np.uint8)


def top_k(logits, labels, k):
    """`[[{"label", "prob"}, ...] per image]`: the k most probable classes, best first."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": labels[i], "prob": float(p[i])} for i in row] for p, row in zip(probs, best)]


def make_app(artifact, predict=None, max_batch=32, max_wait=0.005, max_concurrency=256, max_body=8 << 20,
             default_k=5, timeout=60.0, max_pixels=MAX_PIXELS):
    """The server's ASGI app for a loaded artifact (`fnlearn.export.load`).

    Args:
      artifact: what it serves; `labels`, `input_shape` and `meta` are read from it.
      predict: `images -> logits` (default: `bucketed(artifact, max_batch)`).
      max_batch: images per model call at most.
      max_wait: seconds a request waits for others to share its batch.
      max_concurrency: predictions in flight at once; more get a 503 at once.
      max_body: request body size limit in bytes.
      default_k: classes returned an image when the request gives no `k`.
      timeout: seconds a request may take to send its body (then 408) or to get its logits (then 504).
      max_pixels: an image file of more pixels (width x height) is refused (413) before it is decoded.
    """
    predict = predict or bucketed(artifact, max_batch)
    labels, shape = artifact.labels, tuple(artifact.input_shape)
    batcher, metrics = Batcher(predict, max_batch, max_wait), Metrics()
    in_flight = 0

    async def predict_route(request):
        nonlocal in_flight
        if in_flight >= max_concurrency:
            return JSONResponse({"error": f"server busy: {in_flight} predictions in flight; retry later"},
                                status_code=503, headers={"Retry-After": "1"})
        in_flight += 1
        try:
            text = request.query_params.get("k", str(min(default_k, len(labels))))
            k = int(text) if text.isascii() and text.isdigit() and len(text) < 10 else 0
            if not 1 <= k <= len(labels):
                raise RequestError(400, f"k={text!r}: pass a whole number from 1 to {len(labels)} (the classes)")
            try:
                async with asyncio.timeout(timeout):
                    body = await _body(request, max_body)
            except TimeoutError:
                raise RequestError(408, f"the body took over {timeout:g} s to arrive")
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "application/json" or (not kind and body.lstrip()[:1] == b"{"):
                images = await run_in_threadpool(decode_json, body, shape)  # megabytes of JSON take a while
            elif kind.startswith("image/") or kind in ("", "application/octet-stream"):
                images = await run_in_threadpool(decode_image, body, shape, max_pixels)
            else:
                raise RequestError(415, f"Content-Type {kind} is not served: send an image file as the body "
                                        f"(image/png, image/jpeg) or JSON (application/json)")
            try:
                logits = await asyncio.wait_for(batcher(images), timeout)
            except ModelError:
                raise RequestError(500, "internal error while running the model; the server log has the cause")
            except TimeoutError:
                raise RequestError(504, f"the model did not answer within {timeout:g} s")
            return JSONResponse({"predictions": top_k(logits, labels, k)})
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except ClientDisconnect:  # the caller hung up mid-body: nobody to answer, no server fault
            return Response(status_code=499)  # nginx's "client closed request", for /metrics
        except Exception:  # answered here, so it is logged once (Starlette's handler would log it twice)
            logger.exception("internal error on POST /predict")
            return JSONResponse({"error": "internal error; the server log has the cause"}, status_code=500)
        finally:
            in_flight -= 1

    async def health(request):
        if batcher_task is None or batcher_task.done():  # predictions would wait forever
            return JSONResponse({"status": "error", "error": "the batcher has stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": artifact.meta.get("model"), "input_shape": list(shape),
                             "labels": labels})

    async def metrics_route(request):
        return JSONResponse(metrics.report(list(batcher.batch_sizes), batcher.queue.qsize()))

    async def http_error(request, error):  # unknown routes, wrong methods: JSON like the rest
        return JSONResponse({"error": f"{error.detail}: {request.method} {request.url.path}; the routes are "
                                      f"POST /predict, GET /health, GET /metrics"}, status_code=error.status_code,
                            headers=error.headers)  # a 405's Allow

    async def internal_error(request, error):
        logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse({"error": "internal error; the server log has the cause"}, status_code=500)

    batcher_task = None

    def stopped(task):
        if not task.cancelled() and task.exception() is not None:
            logger.error("the batcher stopped", exc_info=task.exception())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal batcher_task
        batcher_task = asyncio.create_task(batcher.run())
        batcher_task.add_done_callback(stopped)
        yield
        batcher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batcher_task
        batcher.executor.shutdown(wait=False)

    app = Starlette(routes=[Route("/predict", predict_route, methods=["POST"]),
                            Route("/health", health, methods=["GET"]),
                            Route("/metrics", metrics_route, methods=["GET"])],
                    exception_handlers={HTTPException: http_error, Exception: internal_error}, lifespan=lifespan)
    return _Measured(app, metrics)
