"""CIFAR-10 classification: the main job. airbench94_muon's recipe by default.

    python -m experiments.cifar                                        # TFDS cifar10 (online)
    python -m experiments.cifar --data ../shared/data/cifar10-jpeg.tar.gz
    python -m experiments.cifar --preset airbench94 --data ../shared/data/cifar10-jpeg.tar.gz
    python -m experiments.cifar --preset resnet18 --precision bf16
    python -m experiments.cifar --preset smoke --data ../shared/data/cifar10-jpeg.tar.gz

Presets: `airbench94_muon` (the default: the 94% record's recipe, Muon on the conv filters,
batch 2000, 8 epochs), `airbench94` (the earlier record: Nesterov SGD, 9.9 epochs),
`resnet18`, `smoke`. Any config field can be overridden after the preset (`--epochs 4`).
Writes to `--workdir`: summary.json, TensorBoard events, curves.png, confusion.png and a
checkpoint per epoch (`--resume` continues a killed run).

On a 2-core CPU the default recipe takes about half an hour and reaches about 90.7% with
TTA, as airbench94 does in a fifth more time; `--preset smoke` takes under a minute and
reaches about 55% on a class-balanced test subset. The README has the measured figures.
"""
import dataclasses
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np
import optax
from jax.experimental import multihost_utils

from experiments import cli
from fnlearn.checkpoint import CheckpointError
from fnlearn.cli import SEEDS
from fnlearn.data import DataError, load_dataset
from fnlearn.ops import onednn
from fnlearn.parallel import data_mesh
from fnlearn.recipes.cifar import (CHOICES, DEFAULT_PRESET, PRESETS, CifarConfig, ConfigError, TrainingDiverged,
                                   backward_bytes, check_data, check_devices, check_resume,
                                   train_and_evaluate)
from fnlearn.report import TensorBoardWriter, plot_confusion, plot_curves
from fnlearn.tools.tensorboard import StepSummaries


def _help(field):
    """A field's help with its choices and default, and where a preset sets it otherwise."""
    notes = [f"one of {', '.join(CHOICES[field.name])}"] if field.name in CHOICES else []
    default = getattr(PRESETS[DEFAULT_PRESET], field.name)
    if default is not None:
        # :g keeps 6 digits of a preset's derived rate (airbench94_muon's lr is 0.67 * 1024 * (1 + 1/0.15)).
        def show(value):
            return f"{value:g}" if isinstance(value, float) else str(value)
        others = [f"{name}: {show(getattr(preset, field.name))}" for name, preset in PRESETS.items()
                  if getattr(preset, field.name) != default]
        notes.append(f"default: {show(default)}" + (f"; {', '.join(others)}" if others else ""))
    help = field.metadata["help"] + (f" ({'; '.join(notes)})" if notes else "")
    return help.replace("%", "%%")


def parse_config(argv):
    """`(cfg, args, parser)`: a CifarConfig from `--preset` plus any field given as `--field-name value`."""
    parser = cli.make_parser("cifar", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="the recipe to start from; the other flags override its fields")
    parser.add_argument("--workdir", type=Path, default=Path("runs/cifar"),
                        help="where summary.json, plots, TensorBoard events and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --workdir")
    cli.process_flags(parser)
    cli.debug_flags(parser, "trace the second call of steps (a warm program) with jax.profiler into WORKDIR/profile "
                            "and print its slowest ops (open it with tensorboard --logdir WORKDIR/profile)")
    cli.add_config_flags(parser, CifarConfig, _help, CHOICES)
    args = parser.parse_args(argv)
    try:
        cfg = dataclasses.replace(PRESETS[args.preset], **cli.config_overrides(args, CifarConfig))
    except ValueError as e:
        parser.error(str(e))
    if cfg.seed + cfg.runs - 1 not in SEEDS:
        parser.error(f"--seed {cfg.seed} --runs {cfg.runs}: run i uses seed + i, which must stay below 2**32")
    cli.check_workdir(parser, args.workdir)
    return cfg, args, parser


def write_outputs(workdir, cfg, results, dataset):
    """summary.json and the PNGs for the runs in `results`."""
    accuracies = [r.test_accuracy for r in results]
    summary = {
        "test_accuracy": float(np.mean(accuracies)),
        "test_accuracy_std": float(np.std(accuracies)),
        "test_accuracy_runs": accuracies,
        "test_accuracy_no_tta": float(np.mean([r.test_accuracy_plain for r in results])),
        "train_seconds": float(np.mean([r.train_seconds for r in results])),
        "train_seconds_runs": [r.train_seconds for r in results],
        "compile_seconds": float(np.mean([r.compile_seconds for r in results])),
        "eval_seconds": float(np.mean([r.eval_seconds for r in results])),
        "final_eval_seconds": float(np.mean([r.final_eval_seconds for r in results])),
        # The compiled train program's arguments, outputs and temporaries, per device, data set included;
        # and the activations one batch keeps for its backward pass (what --remat cuts).
        "train_program_mib": results[0].train_program_bytes / 2**20,
        "backward_mib": backward_bytes(cfg, len(dataset.class_names), dataset.train_images.shape[1:]) / 2**20,
        "epochs": cfg.epochs,
        "steps": results[0].steps,
        "model": cfg.model,
        "precision": cfg.precision,
        "class_names": list(dataset.class_names),
        # The first run's final evaluation: row = true class, column = predicted.
        "confusion": results[0].confusion,
        "skipped_files": list(dataset.skipped),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_kernels": onednn.describe(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "config": dataclasses.asdict(cfg),
        "history": [r.history for r in results],
    }
    cli.write_json(workdir / "summary.json", summary)
    plot_curves(results[0].history, workdir / "curves.png")
    plot_confusion(np.array(results[0].confusion), dataset.class_names, workdir / "confusion.png")
    return summary


def _count(n, noun):
    return f"{n:g} {noun}" + ("" if n == 1 else "s")


def _banner(cfg, dataset):
    sizes = []
    for n, total, split in ((cfg.train_subset, len(dataset.train_images), "train"),
                            (cfg.test_subset, len(dataset.test_images), "test")):
        sizes.append(f"{n} of {total} {split}" if n else f"{total} {split}")
    subsets = " (class-balanced subsets)" if cfg.train_subset or cfg.test_subset else ""
    return (f"{cfg.model} on {dataset.source}: {' / '.join(sizes)} images{subsets}; {_count(cfg.epochs, 'epoch')}, "
            f"batch {cfg.batch_size}, {cfg.precision}, on {_devices()}")


def _devices():
    devices = jax.devices()
    return str(devices[0]) if len(devices) == 1 else f"{len(devices)} devices ({devices[0].platform}, data parallel)"


def run_one(cfg, dataset, workdir, run, resume, main_process=True, profile=None, tensorboard_every=0,
            detect_anomaly=False):
    """One run, its TensorBoard scalars written as each epoch ends (a killed run keeps its history);
    only process 0 of a multi-process run logs and writes scalars."""
    scalars = TensorBoardWriter(workdir / "tensorboard" / f"run{run}") if main_process else None
    try:
        result = train_and_evaluate(cfg, dataset, run=run, resume=resume, on_epoch=scalars,
                                    checkpoint_dir=workdir / "checkpoints" / f"run{run}",
                                    progress=main_process, log=print if main_process else _quiet,
                                    profile=profile, detect_anomaly=detect_anomaly,
                                    # Every process runs the same step program; process 0 alone writes.
                                    summaries=StepSummaries(scalars, tensorboard_every) if tensorboard_every else None)
        if scalars:
            scalars(result.history.epochs, {"final/test_accuracy": result.test_accuracy})
    finally:
        if scalars:
            scalars.close()
    return result


def _quiet(*args, **kwargs):
    pass


def main(argv=None):
    cfg, args, parser = parse_config(argv)
    if not cli.join_processes(parser, args):
        return run(cfg, args)
    try:
        return run(cfg, args)
    except BaseException as e:
        # Exit at once: a normal exit waits on JAX's shutdown barrier for every process, and a
        # peer blocked in a collective with this one never gets there; exiting breaks its
        # connections, so it fails as well instead of hanging.
        if isinstance(e, SystemExit):
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        elif isinstance(e, jax.errors.JaxRuntimeError) and any(
                sign in str(e) for sign in ("Gloo", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Barrier", "Connection")):
            code = 1
            print(f"error: process {jax.process_index()} lost touch with the run's other processes (did one "
                  f"stop? its log says why): {str(e).splitlines()[0]}", file=sys.stderr)
        else:
            code = 1
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(cfg, args):
    """The runs of `cfg`, with the outputs to `args.workdir`; returns the summary (None in processes
    other than process 0, which alone logs and writes)."""
    several, main_process = jax.process_count() > 1, jax.process_index() == 0
    say = print if main_process else _quiet
    workdir = args.workdir
    try:
        # Refuse a changed config, a batch the devices cannot share or a clash with saved
        # checkpoints before loading any data.
        check_devices(cfg, data_mesh())
        saved = [check_resume(dataclasses.replace(cfg, seed=cfg.seed + run), workdir / "checkpoints" / f"run{run}",
                              args.resume) for run in range(cfg.runs)]
        if args.resume and all(epoch is None for epoch in saved):
            say(f"--resume: {workdir / 'checkpoints'} holds no checkpoints yet; starting the run afresh")
        if several and not main_process:
            multihost_utils.sync_global_devices("data prepared")  # process 0 prepares it, once
        dataset = load_dataset(cfg.data, data_dir=cfg.data_dir, skip_corrupt=cfg.skip_corrupt).rgb()
        if several and main_process:
            multihost_utils.sync_global_devices("data prepared")
        check_data(cfg, dataset)  # before the workdir gets its first file
    except (ConfigError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    workdir.mkdir(parents=True, exist_ok=True)
    say(_banner(cfg, dataset))
    if several and not main_process:
        print(f"process {jax.process_index()} of {jax.process_count()}, on {jax.local_device_count()} of the run's "
              f"{jax.device_count()} devices; process 0 logs and writes the outputs", flush=True)
    results = []
    for run in range(cfg.runs):
        if cfg.runs > 1:
            say(f"run {run + 1}/{cfg.runs} (seed {cfg.seed + run})")
        t0 = time.perf_counter()
        try:
            result = run_one(cfg, dataset, workdir, run, args.resume, main_process,
                             profile=workdir / "profile" if args.profile and run == 0 and main_process else None,
                             tensorboard_every=args.tensorboard_every, detect_anomaly=args.detect_anomaly)
        except (ConfigError, CheckpointError) as e:
            sys.exit(f"error: {e}")
        except TrainingDiverged as e:
            sys.exit(cli.diverged_message(e, workdir, {"model": cfg.model, "class_names": list(dataset.class_names)}))
        except KeyboardInterrupt:
            print(f"\ninterrupted; the checkpoints in {workdir / 'checkpoints'} are intact: "
                  f"rerun with --resume to continue", file=sys.stderr, flush=True)
            # A normal exit would wait for the steps already queued on the device (a call or
            # two, up to tens of seconds); the checkpoints and TensorBoard events are complete.
            sys.stdout.flush()
            os._exit(130)
        accuracy = f"test accuracy {result.test_accuracy:.4f}"
        if cfg.tta:
            accuracy += f" with TTA ({result.test_accuracy_plain:.4f} without)"
        say(f"{accuracy}; training {result.train_seconds:.1f} s, compile {result.compile_seconds:.1f} s, "
            f"evaluation {result.eval_seconds:.1f} s (the final{' TTA' if cfg.tta else ''} pass "
            f"{result.final_eval_seconds:.1f} s), total {time.perf_counter() - t0:.1f} s; the compiled train "
            f"program holds {result.train_program_bytes / 2**20:.0f} MiB a device")
        results.append(result)
    if not main_process:
        return None
    summary = write_outputs(workdir, cfg, results, dataset)
    print(f"activations one batch keeps for its backward pass: {summary['backward_mib']:.0f} MiB"
          f"{' (with --remat)' if cfg.remat else ' (--remat cuts them)'}")
    if cfg.runs > 1:
        print(f"mean over {cfg.runs} runs: {summary['test_accuracy']:.4f} ± {summary['test_accuracy_std']:.4f}")
    print(f"wrote {workdir}/summary.json, curves.png, confusion.png, tensorboard/")
    return summary


if __name__ == "__main__":
    main()
