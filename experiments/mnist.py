"""MNIST with the tutorials' SimpleNet (784-128-10) or the CNN family, through fnlearn's data layer.

    python -m experiments.mnist                                   # TFDS mnist (online)
    python -m experiments.mnist --data path/to/mnist-folder-or.tar.gz --model cnn

`--data` takes an image-folder tree or archive, <root>/{train,test}/<class>/*.png.
Adam 1e-3, batch 64, 5 epochs; the whole data set sits on the device and each
epoch is one jitted step per batch. Writes `summary.json` (with `test_accuracy`)
to the workdir, and with `--tensorboard-every N` TensorBoard events to WORKDIR/tensorboard.
Target with TFDS MNIST: >= 97.5% for SimpleNet in 5 epochs.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import cli
from fnlearn import models
from fnlearn.data import DataError, load_dataset
from fnlearn.parallel import check_divides, data_mesh
from fnlearn.report import TensorBoardWriter
from fnlearn.tools.tensorboard import StepSummaries
from fnlearn.train import TrainingDiverged, TrainState, fit, make_optimizer


def standardize(train, test):
    """Scales uint8 images to [0, 1], then to zero mean and unit variance with the train set's stats."""
    train, test = (jnp.asarray(a, jnp.float32) / 255.0 for a in (train, test))
    mean, std = train.mean(), train.std()
    return (train - mean) / std, (test - mean) / std


def main(argv=None):
    parser = cli.make_parser("mnist", __doc__)
    parser.add_argument("--data", default="mnist", help="'mnist' (TFDS) or an image-folder tree / .tar.gz")
    parser.add_argument("--data-dir", help="TFDS data dir for the prepared array_record files "
                                           "(if left out: TFDS's own, ~/tensorflow_datasets)")
    parser.add_argument("--model", default="simple_net", choices=("simple_net", "net", "cnn"),
                        help="which model to train: %(choices)s")
    parser.add_argument("--epochs", type=cli.positive_int, default=5, help="passes over the training set")
    parser.add_argument("--batch-size", type=cli.positive_int, default=64,
                        help="examples per step; at most the training set's size")
    parser.add_argument("--lr", type=cli.positive_float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=cli.seed, default=0, help="PRNG seed for init and shuffling")
    parser.add_argument("--compiled", action="store_true", help="run all epochs as one compiled program")
    parser.add_argument("--workdir", type=Path, default=Path("runs/mnist"),
                        help="folder for summary.json, created if missing")
    cli.debug_flags(parser, "trace the second step (with --compiled: the whole run) with jax.profiler into "
                            "WORKDIR/profile and print its slowest ops (open it with tensorboard --logdir "
                            "WORKDIR/profile)")
    args = parser.parse_args(argv)
    cli.check_workdir(parser, args.workdir)
    try:
        check_divides(data_mesh(), {"--batch-size": args.batch_size})  # fit trains on every device
        dataset = load_dataset(args.data, data_dir=args.data_dir)
    except (ValueError, DataError) as e:
        sys.exit(f"error: {e}")
    n_train = len(dataset.train_images)
    if args.batch_size > n_train:  # fit would refuse it too, but without naming the flag
        sys.exit(f"error: --batch-size {args.batch_size} is larger than the {n_train} training images "
                 f"of {dataset.source}: pass at most {n_train}")
    x, x_test = standardize(dataset.train_images, dataset.test_images)
    y, y_test = jnp.asarray(dataset.train_labels), jnp.asarray(dataset.test_labels)
    print(f"{args.model} on {dataset.source}: {len(x)} train / {len(x_test)} test images {x.shape[1:]}")

    model = models.get(args.model)
    init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
    state = TrainState.create(apply_fn=model.apply, variables=model.init(init_key, x[:1]),
                              tx=make_optimizer("adam", args.lr))
    args.workdir.mkdir(parents=True, exist_ok=True)
    writer = TensorBoardWriter(args.workdir / "tensorboard") if args.tensorboard_every else None
    try:
        state, history = fit(state, (x, y), epochs=args.epochs, batch_size=args.batch_size, key=shuffle_key,
                             eval_data=(x_test, y_test), compiled=args.compiled, log_every=1,
                             detect_anomaly=args.detect_anomaly,
                             summaries=StepSummaries(writer, args.tensorboard_every, {"lr": lambda _: args.lr})
                             if writer else None,
                             profile=args.workdir / "profile" if args.profile else None)
    except TrainingDiverged as e:
        sys.exit(cli.diverged_message(e, args.workdir, {"model": args.model}))
    finally:
        if writer:
            writer.close()
    summary = {"test_accuracy": history["eval_accuracy"][-1], "model": args.model, "epochs": args.epochs,
               "seconds": sum(history["epoch_seconds"]), "history": history}
    cli.write_json(args.workdir / "summary.json", summary)
    print(f"test accuracy {summary['test_accuracy']:.4f}; wrote {args.workdir}/summary.json")
    return summary


if __name__ == "__main__":
    main()
