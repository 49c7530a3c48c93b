"""The seed regression: fit y = x² + noise with a 1-20-1 ReLU net, and a line with SGD.

    python -m experiments.regression [--workdir runs/regression] [--mode compiled|step]

Takes seconds on a 2-core CPU, mostly start-up and compilation. After 100 epochs
the MSE is about 0.05 on the noisy targets (the noise floor is 0.2² = 0.04); the
line's w and b come back within 0.01. Writes `summary.json` and `regression.png`
(loss curve and fit) to the workdir, and with `--tensorboard-every N` TensorBoard events to
WORKDIR/tensorboard/{net,line}.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import cli  # noqa: E402
from fnlearn.models import LinearRegression, RegressionNet  # noqa: E402
from fnlearn.parallel import data_mesh  # noqa: E402
from fnlearn.report import TensorBoardWriter  # noqa: E402
from fnlearn.tools.tensorboard import StepSummaries  # noqa: E402
from fnlearn.train import TrainingDiverged, TrainState, fit, make_optimizer, mse  # noqa: E402


def seed_data(key, n=100, noise=0.2):
    """X = linspace(-1, 1, n) as (n, 1); y = X² + noise·N(0, 1)."""
    x = jnp.linspace(-1.0, 1.0, n)[:, None]
    return x, x**2 + noise * jax.random.normal(key, x.shape)


def train(model, x, y, optimizer, epochs, key, compiled, log_every, workdir=None, **debug):
    """Full-batch training of `model` on (x, y); returns (state, history). `debug`: `fit`'s
    `detect_anomaly`, `summaries` and `profile`; a divergence exits with its one-line error
    (the last finite weights, where kept, saved under `workdir`)."""
    init_key, shuffle_key = jax.random.split(key)
    state = TrainState.create(apply_fn=model.apply, variables=model.init(init_key, x), tx=optimizer)
    try:
        # 100 points on one device: splitting a batch this small over several would only add traffic.
        return fit(state, (x, y), epochs=epochs, key=shuffle_key, loss_fn=mse, compiled=compiled,
                   mesh=data_mesh(jax.devices()[:1]), progress=False, log_every=log_every, **debug)
    except TrainingDiverged as e:
        sys.exit(cli.diverged_message(e, workdir, {"model": type(model).__name__}))


def plot(path, history, x, y, prediction):
    fig, (ax_loss, ax_fit) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"])
    ax_loss.set(xlabel="epoch", ylabel="MSE", yscale="log", title="training loss")
    ax_fit.scatter(x[:, 0], y[:, 0], s=8, label="data")
    ax_fit.plot(x[:, 0], prediction[:, 0], color="C1", label="RegressionNet")
    ax_fit.set(xlabel="x", ylabel="y", title="fit")
    ax_fit.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = cli.make_parser("regression", __doc__)
    parser.add_argument("--workdir", default="runs/regression", type=Path,
                        help="folder for summary.json and regression.png, created if missing")
    parser.add_argument("--epochs", type=cli.positive_int, default=100, help="full-batch epochs of RegressionNet")
    parser.add_argument("--mode", choices=("compiled", "step"), default="compiled",
                        help="compiled: the whole run is one jitted lax.scan; step: a jitted step per epoch")
    parser.add_argument("--seed", type=cli.seed, default=0, help="PRNG seed for data, init and shuffling")
    cli.debug_flags(parser, "trace RegressionNet's second step (in compiled mode: its whole run) with jax.profiler "
                            "into WORKDIR/profile and print its slowest ops")
    args = parser.parse_args(argv)
    cli.check_workdir(parser, args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    compiled = args.mode == "compiled"
    data_key, net_key, line_key, line_noise = jax.random.split(jax.random.key(args.seed), 4)

    x, y = seed_data(data_key)
    writers = {name: TensorBoardWriter(args.workdir / "tensorboard" / name) for name in ("net", "line")
               } if args.tensorboard_every else {}

    def debug(name, lr):
        return {"workdir": args.workdir, "detect_anomaly": args.detect_anomaly,
                "summaries": StepSummaries(writers[name], args.tensorboard_every, {"lr": lambda _: lr})
                if writers else None}

    print(f"RegressionNet (1-20-1, ReLU), Adam lr 0.01, {args.epochs} full-batch epochs, {args.mode} mode")
    try:
        state, history = train(RegressionNet(), x, y, make_optimizer("adam", 0.01), args.epochs, net_key,
                               compiled, log_every=20, **debug("net", 0.01),
                               profile=args.workdir / "profile" if args.profile else None)
        true_w, true_b = 2.0, -0.5
        line_y = true_w * x + true_b + 0.1 * jax.random.normal(line_noise, x.shape)
        line, _ = train(LinearRegression(), x, line_y, make_optimizer("sgd", 0.01), 2000, line_key,
                        compiled, log_every=0, **debug("line", 0.01))
    finally:
        for writer in writers.values():
            writer.close()
    prediction = state.apply_fn({"params": state.params}, x)
    plot(args.workdir / "regression.png", history, x, y, prediction)
    w = float(line.params["Linear_0"]["kernel"][0, 0])
    b = float(line.params["Linear_0"]["bias"][0])
    print(f"LinearRegression, SGD lr 0.01, 2000 epochs: w = {w:.3f} (true {true_w}), b = {b:.3f} (true {true_b})")

    summary = {"final_loss": history["train_loss"][-1], "final_grad_norm": history["train_grad_norm"][-1],
               "epochs": args.epochs, "mode": args.mode, "compile_seconds": history.get("compile_seconds"),
               "line_w": w, "line_b": b}
    cli.write_json(args.workdir / "summary.json", summary)
    print(f"final loss {summary['final_loss']:.4f}; wrote {args.workdir}/summary.json and regression.png")
    return summary


if __name__ == "__main__":
    main()
