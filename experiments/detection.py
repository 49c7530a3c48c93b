"""Object detection: a YOLO-style detector trained from scratch on canvases of CIFAR-10 objects.

    python -m experiments.detection --data ../shared/data/cifar10-jpeg.tar.gz
    python -m experiments.detection --data ../shared/data/cifar10-jpeg.tar.gz --preset smoke

Each 128x128 canvas is a CIFAR-10 image scaled up, with 1 to 4 other images (24 to 64 pixels)
pasted on it: train canvases from the train split, test canvases from the test split, made
once and kept as array_record files (`fnlearn.data.load_canvases`). Prints the loss terms
and COCO's mAP@0.5 and mAP@0.5:0.95 after each epoch; writes to `--workdir` summary.json
(`map50`, `map50_95`, `train_seconds`), detections.png (test canvases: predictions beside the
ground truth), curves.png, TensorBoard events and a checkpoint per epoch (`--resume`
continues a killed run). Its measured run time and mAP are in docs/performance.md.
"""
import dataclasses
import math
import os
import platform
import sys
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from experiments import cli
from fnlearn import models
from fnlearn.checkpoint import CheckpointError
from fnlearn.data import DataError, load_canvases, load_dataset
from fnlearn.recipes.cifar import check_resume
from fnlearn.recipes.detection import PRESETS, RESUMABLE, ConfigError, DetectionConfig, train_and_evaluate
from fnlearn.report import TensorBoardWriter
from fnlearn.train import TrainingDiverged


def _help(field):
    default = getattr(PRESETS["default"], field.name)
    smoke = getattr(PRESETS["smoke"], field.name)
    notes = f" (default: {default}" + (f"; smoke: {smoke}" if smoke != default else "") + ")"
    choices = {"model": models.names(task="detector"), "precision": ("fp32", "bf16")}.get(field.name)
    notes += f"; one of {', '.join(choices)}" if choices else ""
    return (field.metadata["help"] + ("" if default is None else notes)).replace("%", "%%")


def parse_config(argv):
    """`(cfg, args)`: a DetectionConfig from `--preset` plus any field given as `--field-name value`."""
    parser = cli.make_parser("detection", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="the run to start from; flags override its fields")
    parser.add_argument("--workdir", type=Path, default=Path("runs/detection"),
                        help="where summary.json, the PNGs, TensorBoard events and checkpoints go")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --workdir")
    cli.add_config_flags(parser, DetectionConfig, _help)
    args = parser.parse_args(argv)
    try:
        cfg = dataclasses.replace(PRESETS[args.preset], **cli.config_overrides(args, DetectionConfig))
    except ValueError as e:
        parser.error(str(e))
    cli.check_workdir(parser, args.workdir)
    return cfg, args


def plot_detections(path, test, predictions, class_names, count=16, threshold=0.3):
    """A grid of the first `count` test canvases: predictions scoring above `threshold` in colour with
    their class and score, the ground truth in dashed white."""
    boxes, scores, classes, valid = predictions
    columns, rows = 4, math.ceil(count / 4)
    fig = Figure(figsize=(3 * columns, 3 * rows))
    for i, ax in enumerate(fig.subplots(rows, columns).ravel()):
        ax.axis("off")
        if i >= min(count, len(test.images)):
            continue
        ax.imshow(test.images[i])
        for box in test.boxes[i, :test.counts[i]]:
            ax.add_patch(Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, edgecolor="white", linestyle="--"))
        for box, s, c in zip(boxes[i][valid[i]], scores[i][valid[i]], classes[i][valid[i]]):
            if s < threshold:
                continue
            colour = f"C{c % 10}"
            ax.add_patch(Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, edgecolor=colour, linewidth=1.5))
            ax.text(box[0], box[1], f"{class_names[c]} {s:.2f}", color="white", fontsize=7, va="bottom",
                    bbox={"facecolor": colour, "pad": 1, "linewidth": 0})
    fig.suptitle(f"test canvases: predictions (score >= {threshold}) and ground truth (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(history, path):
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_map = fig.subplots(1, 2)
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    for name in ("train_loss", "train_box", "train_obj", "train_cls"):
        ax_loss.plot(epochs, history[name], marker="o", label=name.removeprefix("train_"))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss and its terms")
    ax_map.plot(epochs, history["eval_map50"], marker="o", label="mAP@0.5")
    ax_map.plot(epochs, history["eval_map50_95"], marker="o", label="mAP@0.5:0.95")
    ax_map.set(xlabel="epoch", ylabel="mAP", title="test mAP (COCO, 101-point)")
    for ax in (ax_loss, ax_map):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    cfg, args = parse_config(argv)
    try:
        if check_resume(cfg, args.workdir / "checkpoints", args.resume, RESUMABLE) is None and args.resume:
            print(f"--resume: {args.workdir / 'checkpoints'} holds no checkpoints yet; starting the run afresh")
        dataset = load_dataset(cfg.data, data_dir=cfg.data_dir).rgb()
        train, test = load_canvases(dataset, train=cfg.train_canvases, test=cfg.test_canvases, seed=cfg.canvas_seed,
                                    data_dir=cfg.data_dir)
    except (ConfigError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.model} on {len(train.images)} train / {len(test.images)} test canvases of {dataset.source}; "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.precision}, on {jax.devices()[0]}")
    writer = TensorBoardWriter(workdir / "tensorboard")
    try:
        result = train_and_evaluate(cfg, train, test, len(dataset.class_names), checkpoint_dir=workdir / "checkpoints",
                                    resume=args.resume, on_epoch=writer)
    except (ConfigError, CheckpointError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"\ninterrupted; the checkpoints in {workdir / 'checkpoints'} are intact: rerun with --resume to "
              f"continue", file=sys.stderr, flush=True)
        os._exit(130)
    finally:
        writer.close()
    summary = {"map50": result.map50, "map50_95": result.map50_95, "train_seconds": result.train_seconds,
               "compile_seconds": result.compile_seconds, "model": cfg.model, "epochs": cfg.epochs,
               "class_names": list(dataset.class_names), "device_kind": jax.devices()[0].device_kind,
               "versions": {"python": platform.python_version(), "jax": jax.__version__,
                            "jaxlib": jaxlib.__version__, "flax": flax.__version__},
               "config": dataclasses.asdict(cfg), "history": result.history}
    cli.write_json(workdir / "summary.json", summary)
    plot_detections(workdir / "detections.png", test, result.predictions, dataset.class_names)
    plot_curves(result.history, workdir / "curves.png")
    print(f"test mAP@0.5 {result.map50:.4f}, mAP@0.5:0.95 {result.map50_95:.4f}; training "
          f"{result.train_seconds:.0f} s; wrote {workdir}/summary.json, detections.png, curves.png")
    return summary


if __name__ == "__main__":
    main()
