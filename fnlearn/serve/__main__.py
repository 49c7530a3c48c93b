"""Serve an exported classifier over HTTP (Starlette under uvicorn).

    python -m experiments.export --checkpoint runs/cifar/checkpoints/run0 --out cifar.zip
    python -m fnlearn.serve --artifact cifar.zip --port 8000
    curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'localhost:8000/predict?k=3'
    curl -d '{"inputs": [[[[0, 0, 0], ...]]]}' -H 'Content-Type: application/json' localhost:8000/predict
    curl localhost:8000/health; curl localhost:8000/metrics

The artifact is a StableHLO .zip or an .onnx file from `python -m experiments.export`.
Each batch size the model sees (powers of two up to --max-batch) is compiled before the
port opens. See `fnlearn.serve.app` for the routes and what each refusal means.
"""
import logging
import sys
import time

import numpy as np
import uvicorn

from fnlearn.cli import HelpFormatter, Parser, non_negative_float, positive_float, positive_int
from fnlearn.export import ArtifactError, load
from fnlearn.serve.app import MAX_PIXELS, bucketed, make_app


def parse_args(argv):
    parser = Parser(prog="python -m fnlearn.serve", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--artifact", required=True, help="the exported model (.zip StableHLO or .onnx)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every interface")
    parser.add_argument("--max-batch", type=positive_int, default=32,
                        help="images per model call")
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                        help="how long a request waits for others to share its batch; 0: no wait")
    parser.add_argument("--max-concurrency", type=positive_int, default=256,
                        help="predictions in flight at once; more are answered 503")
    parser.add_argument("--max-body-mb", type=positive_float, default=8.0,
                        help="request body limit in MiB")
    parser.add_argument("--max-image-mp", type=positive_float, default=MAX_PIXELS / 1e6,
                        help="an image file of more megapixels is refused before it is decoded")
    parser.add_argument("--top-k", type=positive_int, default=5,
                        help="classes returned when a request gives no k")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="seconds a request may take to send its body (408) or to get its answer (504)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: pass a port from 1 to 65535")
    if args.max_body_mb * 2**20 > 2**40:
        parser.error(f"--max-body-mb {args.max_body_mb:g} is over a TiB: pass a size this machine could hold")
    if round(args.max_image_mp * 1e6) < 1:
        parser.error(f"--max-image-mp {args.max_image_mp:g} is under one pixel: pass 1e-06 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    handler = logging.StreamHandler()  # uvicorn's look, for fnlearn's lines only (not every library's INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger = logging.getLogger("fnlearn.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        artifact = load(args.artifact)
    except ArtifactError as e:
        sys.exit(f"error: {e}")
    predict = bucketed(artifact, args.max_batch)
    start = time.perf_counter()
    try:
        for size in predict.sizes:  # compile every batch shape before the first caller waits on it
            logits = predict(np.zeros((size, *artifact.input_shape), np.uint8))
    except Exception as e:  # an artifact that loads but cannot run here: say so before opening the port
        sys.exit(f"error: {args.artifact} does not run here: {type(e).__name__}: {str(e).splitlines()[0]}")
    if logits.shape[-1] != len(artifact.labels):  # a file not written by fnlearn.export.save
        sys.exit(f"error: {args.artifact} has {len(artifact.labels)} labels for {logits.shape[-1]} logits: "
                 "export it again with one label a logit")
    logger.info(
        "%s (%s, %d classes) ready in %.1f s for batches of %s", args.artifact, artifact.meta.get("format"),
        len(artifact.labels), time.perf_counter() - start, ", ".join(map(str, predict.sizes)))
    app = make_app(artifact, predict, args.max_batch, args.max_wait_ms / 1000, args.max_concurrency,
                   int(args.max_body_mb * 2**20), args.top_k, args.timeout, round(args.max_image_mp * 1e6))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
