"""Transfer learning: pretrain, then fine-tune on a new task with few labels, three ways.

    python -m experiments.transfer --data ../shared/data/cifar10-jpeg.tar.gz
    python -m experiments.transfer --data ../shared/data/cifar10-jpeg.tar.gz --weights resnet18.pth
    python -m experiments.transfer --data ../shared/data/cifar10-jpeg.tar.gz --weights runs/transfer/pretrained

ResNet-18 (torchvision's, ImageNet stem) is pretrained on CIFAR-10's classes 0-4, or taken
from `--weights` (a torchvision state_dict, or an fnlearn checkpoint folder such as the
`pretrained/` this writes). It then gets a new head for classes 5-9, of which 10% of the
training images keep their labels, and trains for the same number of steps three ways: the
head alone, everything (the backbone at the head's rate, or `--backbone-lr-scale` times it),
and from scratch. Prints a
table; writes to `--workdir` summary.json (`head_only`, `full_finetune`, `scratch`: each
final test accuracy as a fraction), transfer.png (the three test-accuracy curves), the
pretrained weights, every run's checkpoints (`--resume` continues a killed experiment) and TensorBoard
events (tensorboard/<run>/).
On the 2-core CPU it takes about 32 minutes; the README has the measured figures.
"""
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import flax
import jax
import jaxlib
import optax
from matplotlib.figure import Figure

from experiments import cli
from fnlearn import models
from fnlearn.checkpoint import CheckpointError
from fnlearn.data import DataError, load_dataset
from fnlearn.models import WeightsError
from fnlearn.recipes.cifar import ConfigError, TrainingDiverged
from fnlearn.recipes.transfer import MODES, PRETRAINING, TransferConfig, check_resumes, load_weights, run_transfer


def _help(field):
    default = field.default
    help = field.metadata["help"] + ("" if default is None else f" (default: {default})")
    if field.name == "model":
        help += f"; one of {', '.join(models.names(task='image_classifier'))}"
    return help.replace("%", "%%")


def parse_config(argv):
    """`(cfg, args)`: a TransferConfig from the defaults and any field given as `--field-name value`."""
    parser = cli.make_parser("transfer", __doc__)
    parser.add_argument("--workdir", type=Path, default=Path("runs/transfer"),
                        help="where summary.json, transfer.png, the pretrained weights and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue the experiment saved in --workdir")
    cli.debug_flags(parser, "trace the first run's second call of steps with jax.profiler into WORKDIR/profile and "
                            "print its slowest ops (open it with tensorboard --logdir WORKDIR/profile)")
    cli.add_config_flags(parser, TransferConfig, _help, {"model": tuple(models.names(task="image_classifier"))})
    args = parser.parse_args(argv)
    try:
        cfg = TransferConfig(**cli.config_overrides(args, TransferConfig))
    except ValueError as e:
        parser.error(str(e))
    if cfg.weights is not None and (pretraining := [f for f in PRETRAINING if hasattr(args, f)]):
        flags = " and ".join("--" + f.replace("_", "-") for f in pretraining)
        parser.error(f"{flags}: for the pretraining, which --weights replaces; drop "
                     f"{'them' if len(pretraining) > 1 else 'it'} or --weights")
    cli.check_workdir(parser, args.workdir)
    return cfg, args


def plot_transfer(results, path):
    """Test accuracy after each epoch of the three runs, against the optimizer step."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for mode in MODES:
        history = results[mode].history
        steps_per_epoch = results[mode].steps / history.epochs
        ax.plot([steps_per_epoch * (e + 1) for e in range(history.epochs)], history["eval_accuracy"], marker="o",
                label=f"{mode} ({results[mode].test_accuracy:.1%})")
    ax.set(xlabel="step", ylabel="test accuracy", title="transfer to the target classes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    cfg, args = parse_config(argv)
    t0 = time.perf_counter()
    try:
        if not check_resumes(cfg, args.workdir, args.resume) and args.resume:
            print(f"--resume: {args.workdir} holds no checkpoints yet; starting the experiment afresh")
        pretrained = load_weights(cfg) if cfg.weights else None
        if pretrained is not None:
            print(f"{cfg.model} from {cfg.weights}")
        dataset = load_dataset(cfg.data, data_dir=cfg.data_dir).rgb()
        results = run_transfer(cfg, dataset, args.workdir, pretrained=pretrained, resume=args.resume,
                               tensorboard_every=args.tensorboard_every, detect_anomaly=args.detect_anomaly,
                               profile=args.profile)
    except (ConfigError, CheckpointError, DataError, WeightsError, ImportError) as e:
        sys.exit(f"error: {e}")
    except TrainingDiverged as e:
        sys.exit(cli.diverged_message(e, args.workdir, {"model": cfg.model}))
    except KeyboardInterrupt:
        print(f"\ninterrupted; the checkpoints in {args.workdir} are intact: rerun with --resume to continue",
              file=sys.stderr, flush=True)
        os._exit(130)  # without waiting for the steps already queued on the device
    wall = time.perf_counter() - t0
    pretrain = results["pretrain"]
    summary = {
        **{mode: results[mode].test_accuracy for mode in MODES},
        "pretrain_test_accuracy": pretrain.test_accuracy if pretrain else None,
        "steps": results["scratch"].steps,
        "label_fraction": cfg.label_fraction,
        "train_seconds": {phase: r.train_seconds for phase, r in results.items() if r},
        "wall_seconds": wall,
        "device_kind": jax.devices()[0].device_kind,
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__},
        "config": dataclasses.asdict(cfg),
        "history": {phase: r.history for phase, r in results.items() if r},
    }
    print(f"\n{'run':<14} {'test acc':>8} {'train s':>8}   ({summary['steps']} steps each)")
    for mode in MODES:
        print(f"{mode:<14} {results[mode].test_accuracy:>8.4f} {results[mode].train_seconds:>8.1f}")
    best = max(results[m].test_accuracy for m in ("head_only", "full_finetune"))
    print(f"transfer beats scratch by {100 * (best - results['scratch'].test_accuracy):.1f} points; "
          f"{wall:.0f} s in all")
    cli.write_json(args.workdir / "summary.json", summary)
    plot_transfer(results, args.workdir / "transfer.png")
    print(f"wrote {args.workdir}/summary.json, transfer.png")
    return summary


if __name__ == "__main__":
    main()
