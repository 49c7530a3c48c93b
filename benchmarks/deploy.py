"""Deployment, measured: inference through the exported ONNX file beside fnlearn and PyTorch,
and the inference server under load from concurrent clients.

    python -m benchmarks.deploy                      # both parts
    python -m benchmarks.deploy infer --batches 1 64 --repeats 5
    python -m benchmarks.deploy serve --clients 1 8 64 --requests 5000 --seconds 10

infer: ResNet-18 (CIFAR stem) and FastNet from the same random weights (BatchNorm
statistics set off their init), on the same uint8 32x32 images, three ways in one process:
fnlearn's jitted forward (uint8 in, normalised inside, as the artifacts do), onnxruntime
on fnlearn's ONNX export of that same function (BatchNorm folded), and PyTorch eager
(`torch.inference_mode`, channels_last, float32 and bf16 autocast, the faster counts, its
input already normalised). Each side warms up first; the best of `--repeats` rounds counts,
the sides taking turns, each run's clock started after one untimed call (as the main bench's).
images/s; ratio = side / PyTorch. Each ONNX file is also converted to ONNX Runtime Mobile's
`.ort` format, whose size and largest difference from the `.onnx` file's logits are reported.

serve: `python -m fnlearn.serve` on FastNet's StableHLO export in its own process, on
127.0.0.1; for each client count, that many threads send PNG images over keep-alive
connections, for a second of warm-up, then until `--requests` answers or `--seconds` have
passed (the clients share this machine's cores with the server). Requests/s and p50/p99
latency.
"""
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks.__main__ import cpu_model
from benchmarks.timing import best_rates, round_rates, seconds_of
from experiments import cli
from fnlearn import export, models
from fnlearn.data import CIFAR10_MEAN, CIFAR10_STD


def trained_like(name):
    """`name`'s random init with BatchNorm statistics off their init (a trained net's are), as variables."""
    model = models.get(name)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * jax.random.normal(next(keys), a.shape) if path[-1].key == "mean"
        else a * (1 + 0.5 * jax.random.uniform(next(keys), a.shape)), variables["batch_stats"])
    return model, {**variables, "batch_stats": stats}


def _last_line(text):
    """A failed subprocess's last line of output, for a one-line error."""
    return (text.strip().splitlines() or ["no output"])[-1]


def mobile(onnx_path, images):
    """`(MiB, max abs difference)` of the `.ort` file ONNX Runtime Mobile takes, converted from `onnx_path`."""
    import onnxruntime

    done = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path)],
                          cwd=onnx_path.parent, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: converting {onnx_path.name} to .ort failed: {_last_line(done.stderr)}")
    ort_path = onnx_path.with_suffix(".ort")
    run = lambda path: onnxruntime.InferenceSession(str(path)).run(["logits"], {"images": images})[0]  # noqa: E731
    return ort_path.stat().st_size / 2**20, float(np.abs(run(ort_path) - run(onnx_path)).max())


def infer_rows(names, batches, repeats, calls):
    """One row per (model, batch): images/s of fnlearn, onnxruntime and PyTorch, and their ratios."""
    import onnxruntime
    import torch

    from benchmarks import torch_models

    rows = []
    for name in names:
        model, variables = trained_like(name)
        fn = export.classifier(model.apply, variables, CIFAR10_MEAN, CIFAR10_STD)
        with tempfile.TemporaryDirectory() as tmp:
            export.save(Path(tmp) / "m.onnx", fn, (32, 32, 3), {"labels": [str(i) for i in range(10)]}, "onnx")
            session = onnxruntime.InferenceSession(str(Path(tmp) / "m.onnx"), providers=["CPUExecutionProvider"])
            onnx_mib = (Path(tmp) / "m.onnx").stat().st_size / 2**20
            ort_mib, ort_difference = mobile(Path(tmp) / "m.onnx", np.zeros((2, 32, 32, 3), np.uint8) + 128)
        net = torch_models.twin(name, jax.device_get(variables)).eval()
        jitted = jax.jit(fn)
        for batch in batches:
            x = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), np.uint8)
            x_torch = torch_models.normalize(torch.from_numpy(x)).contiguous(memory_format=torch.channels_last)

            def torch_step(autocast):
                def step():
                    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                        return net(x_torch)
                return step

            steps = {"fnlearn": lambda: jitted(x), "onnxruntime": lambda: session.run(["logits"], {"images": x})[0],
                     "torch fp32": torch_step(False), "torch bf16": torch_step(True)}
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(x))
            first_call_s = time.perf_counter() - t0  # compilation and one call
            for step in steps.values():  # warm-up: kernel selection, allocations
                seconds_of(step, 2)
            runs = [(lambda s=s: seconds_of(s, calls, lead_in=1), calls * batch) for s in steps.values()]
            rates = dict(zip(steps, best_rates(round_rates(runs, repeats))))
            torch_mode = max(("torch fp32", "torch bf16"), key=rates.get)
            difference = float(np.abs(steps["onnxruntime"]() - np.asarray(steps["fnlearn"]())).max())
            rows.append({"model": name, "batch": batch, "fnlearn_per_s": rates["fnlearn"],
                         "onnx_per_s": rates["onnxruntime"], "torch_per_s": rates[torch_mode],
                         "torch_mode": torch_mode.split()[1], "fnlearn_first_call_s": first_call_s,
                         "onnx_mib": onnx_mib, "onnx_max_abs_diff": difference, "ort_mib": ort_mib,
                         "ort_max_abs_diff_vs_onnx": ort_difference})
    return rows


def print_infer(rows):
    head = (f"{'model':<10}{'batch':>6}{'fnlearn/s':>11}{'onnx/s':>10}{'torch/s':>10}{'torch':>6}"
            f"{'fnlearn/torch':>15}{'onnx/torch':>12}{'onnx MiB':>10}{'max|diff|':>11}{'ort MiB':>9}{'ort diff':>10}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model']:<10}{r['batch']:>6}{r['fnlearn_per_s']:>11.1f}{r['onnx_per_s']:>10.1f}"
              f"{r['torch_per_s']:>10.1f}{r['torch_mode']:>6}{r['fnlearn_per_s'] / r['torch_per_s']:>14.2f}x"
              f"{r['onnx_per_s'] / r['torch_per_s']:>11.2f}x{r['onnx_mib']:>10.1f}{r['onnx_max_abs_diff']:>11.1e}"
              f"{r['ort_mib']:>9.1f}{r['ort_max_abs_diff_vs_onnx']:>10.1e}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path):
    """`(status, body)` of a GET, or (None, b"") where nothing answers yet."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None, b""
    finally:
        connection.close()


def _png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _client(port, bodies, stop, latencies, errors):
    """Sends `bodies` in turn on one keep-alive connection until `stop()`; records each latency."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = 0
    while not stop():
        t0 = time.perf_counter()
        try:
            connection.request("POST", "/predict?k=1", body=bodies[i % len(bodies)],
                               headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            ok = response.status == 200
        except OSError:
            ok = False
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        (latencies if ok else errors).append(time.perf_counter() - t0)
        i += 1
    connection.close()


def serve_rows(client_counts, requests, seconds, max_batch):
    """One row per client count: requests/s, p50 and p99 latency (ms) against a live server."""
    model, variables = trained_like("fastnet")
    fn = export.classifier(model.apply, variables, CIFAR10_MEAN, CIFAR10_STD)
    rng = np.random.default_rng(0)
    bodies = [_png(rng.integers(0, 256, (32, 32, 3), np.uint8)) for _ in range(16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fastnet.zip"
        export.save(path, fn, (32, 32, 3), {"labels": [str(i) for i in range(10)], "model": "fastnet"})
        port = _free_port()
        log = (Path(tmp) / "server.log").open("w+")  # a file: a pipe nobody reads could fill and block
        server = subprocess.Popen([sys.executable, "-m", "fnlearn.serve", "--artifact", str(path), "--port",
                                   str(port), "--max-batch", str(max_batch)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while _get(port, "/health")[0] != 200:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    late = " in 300 s" if server.poll() is None else ""
                    sys.exit(f"error: the server did not start{late}: {_last_line(log.read())}")
                time.sleep(0.2)
            for clients in client_counts:
                latencies, errors = [], []
                warm_until = time.perf_counter() + 1.0
                start = None

                def stop():
                    nonlocal start
                    now = time.perf_counter()
                    if start is None:
                        if now < warm_until:
                            return False
                        start = now
                        latencies.clear()  # the warm-up's answers do not count
                        errors.clear()
                    return len(latencies) + len(errors) >= requests or now - start > seconds

                threads = [threading.Thread(target=_client, args=(port, bodies, stop, latencies, errors))
                           for _ in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - start
                ms = np.array(latencies) * 1000
                percentile = lambda q: float(np.percentile(ms, q)) if len(ms) else None  # noqa: E731
                rows.append({"clients": clients, "requests": len(latencies), "errors": len(errors),
                             "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
                             "p50_ms": percentile(50), "p99_ms": percentile(99)})
            batches = json.loads(_get(port, "/metrics")[1])["batches"]
        finally:
            server.terminate()
            server.wait(30)
            log.close()
    return rows, batches


def print_serve(rows, batches):
    head = f"{'clients':>8}{'requests':>10}{'errors':>8}{'seconds':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
    print(head + "\n" + "-" * len(head))
    ms = lambda v: f"{v:>9.1f}" if v is not None else f"{'-':>9}"  # noqa: E731  (no request answered)
    for r in rows:
        print(f"{r['clients']:>8}{r['requests']:>10}{r['errors']:>8}{r['seconds']:>9.1f}{r['requests_per_s']:>9.1f}"
              f"{ms(r['p50_ms'])}{ms(r['p99_ms'])}")
    print(f"model calls: {batches['count']}, {batches['mean_images']:.1f} images each on average")


def main(argv=None):
    parser = cli.Parser(prog="python -m benchmarks.deploy", description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="part", help="infer, serve, or both (default)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "fastnet"], choices=["resnet18", "fastnet"],
                        help="infer's models")
    parser.add_argument("--batches", nargs="+", type=cli.positive_int, default=[1, 64], help="infer's batch sizes")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="infer's timed rounds; the best counts")
    parser.add_argument("--calls", type=cli.positive_int, default=10, help="infer's calls a timed round")
    parser.add_argument("--clients", nargs="+", type=cli.positive_int, default=[1, 8, 64],
                        help="serve's concurrent clients, one measurement each")
    parser.add_argument("--requests", type=cli.positive_int, default=5000, help="serve's answers per measurement")
    parser.add_argument("--seconds", type=cli.positive_float, default=10.0, help="serve's time limit per measurement")
    parser.add_argument("--max-batch", type=cli.positive_int, default=32, help="the server's --max-batch")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if unknown := [p for p in args.parts if p not in ("infer", "serve")]:
        parser.error(f"unknown part {unknown[0]!r}: choose infer, serve, or neither for both")
    if args.json:
        cli.check_output_file(parser, "--json", args.json)
    # CPU against CPU (onnxruntime and PyTorch run there), unless JAX_PLATFORMS says otherwise:
    # set before jax picks its backend (importing it does not), and inherited by the server.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    parts = args.parts or ["infer", "serve"]
    versions = f"jax {jax.__version__}"
    if "infer" in parts:  # only infer needs these
        try:
            import onnxruntime
            import torch
        except ImportError as e:
            sys.exit(f"error: infer runs {e.name or 'onnxruntime and torch'} beside fnlearn, and it is not "
                     'installed: pip install -e ".[test]"')

        versions += (f", onnxruntime {onnxruntime.__version__}, torch {torch.__version__} with "
                     f"{torch.get_num_threads()} threads")
    print(f"{versions}, on {cpu_model()}")
    results = {}
    if "infer" in parts:
        results["infer"] = infer_rows(args.models, args.batches, args.repeats, args.calls)
        print_infer(results["infer"])
    if "serve" in parts:
        rows, batches = serve_rows(args.clients, args.requests, args.seconds, args.max_batch)
        results["serve"], results["serve_batches"] = rows, batches
        print_serve(rows, batches)
    if args.json:
        cli.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
