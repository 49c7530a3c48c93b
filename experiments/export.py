"""Export a zoo classifier, or a checkpoint you trained, to StableHLO or ONNX.

    python -m experiments.export --checkpoint runs/cifar/checkpoints/run0 --out cifar.zip
    python -m experiments.export --checkpoint runs/cifar/checkpoints/run0 --format onnx --out cifar.onnx
    python -m experiments.export --model resnet18 --format onnx --out resnet18.onnx   # random init
    python -m fnlearn.serve --artifact cifar.zip --port 8000

The file maps uint8 images (B, H, W, C) to float32 logits for any batch size, with the
weights, the normalisation and the labels inside, in eval mode: a StableHLO `.zip`
(`jax.export`, lowered for CPU and CUDA) that `jax.export.deserialize` runs without
fnlearn, or an `.onnx` model (BatchNorm folded) that onnxruntime runs. The command checks
the written file against fnlearn's own forward pass and prints the largest difference.
Without `--checkpoint` the model keeps its random init (for trying the tools). Seconds.
"""
import argparse
import importlib
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from fnlearn import export, models
from fnlearn.checkpoint import CheckpointError, load_variables
from fnlearn.data.augment import NORMALIZATIONS
from fnlearn.pytrees import leaf_shapes, shape_mismatches


def channel_values(text):
    """`"0.49,0.48,0.45"` -> (0.49, 0.48, 0.45); finite numbers only."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated finite numbers, e.g. 0.49,0.48,0.45")
    return values


def parse_args(argv):
    parser = cli.make_parser("export", __doc__)
    parser.add_argument("--model", choices=models.names(task="image_classifier"), metavar="NAME",
                        help=f"the zoo classifier: {', '.join(models.names(task='image_classifier'))} "
                             f"(default: the one the checkpoint's run trained)")
    parser.add_argument("--checkpoint", type=Path,
                        help="its trained weights: a training run's checkpoints folder (or one epoch's), or a "
                             "folder from checkpoint.save_variables (default: the model's random init)")
    parser.add_argument("--format", choices=export.FORMATS,
                        help="what to write (default: onnx for an --out ending in .onnx, else stablehlo)")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (.zip or .onnx by convention)")
    parser.add_argument("--input-shape", default="32,32,3", help="H,W,C of one image")
    parser.add_argument("--labels",
                        help="comma-separated class names, one per logit (default: the checkpoint's, else 0..N-1)")
    parser.add_argument("--num-classes", type=cli.positive_int,
                        help="logits (default: the checkpoint's, else 10)")
    parser.add_argument("--mean", type=channel_values,
                        help="per-channel mean the model was trained with, in [0, 1] units (default: the "
                             "checkpoint's run's normalization, else CIFAR-10's)")
    parser.add_argument("--std", type=channel_values,
                        help="per-channel std the model was trained with, in [0, 1] units (default: as --mean)")
    parser.add_argument("--platforms", default=",".join(export.PLATFORMS),
                        help="StableHLO's lowering platforms, comma-separated (cpu, cuda, rocm, tpu)")
    parser.add_argument("--seed", type=cli.seed, default=0, help="the random init's seed, without --checkpoint")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        parser.error(f"--input-shape {args.input_shape!r} is not H,W,C: pass three positive whole numbers, e.g. 32,32,3")
    args.input_shape = shape
    channels = args.input_shape[-1]
    for flag in ("mean", "std"):
        if getattr(args, flag) is not None and len(getattr(args, flag)) != channels:
            parser.error(f"--{flag} has {len(getattr(args, flag))} values for {channels} channels: pass one a channel")
    if args.std is not None and min(args.std) <= 0:
        parser.error("--std must be positive")
    if args.mean is not None and not all(0 <= v <= 1 for v in args.mean):
        parser.error(f"--mean {','.join(f'{v:g}' for v in args.mean)} is not in [0, 1] units: divide 0-255 "
                     "values by 255, e.g. 0.49,0.48,0.45")
    if args.labels is not None and not all(name.strip() for name in args.labels.split(",")):
        parser.error(f"--labels {args.labels!r} has an empty name: pass one name a class, e.g. cat,dog,frog")
    args.platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    unknown = [p for p in args.platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
    if unknown or not args.platforms:
        parser.error(f"--platforms {','.join(unknown)!r}: choose among cpu, cuda, rocm, tpu")
    if args.checkpoint is not None and not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such folder")
    if args.model is None and args.checkpoint is None:
        parser.error("pass --model NAME, or a --checkpoint whose run names its model")
    if args.out.is_dir() or not args.out.parent.is_dir():
        parser.error(f"--out {args.out} must be a file in an existing folder")
    suffix = {"onnx": ".onnx", "stablehlo": ".zip"}
    args.format = args.format or ("onnx" if args.out.suffix == ".onnx" else "stablehlo")
    if args.out.suffix in suffix.values() and args.out.suffix != suffix[args.format]:
        parser.error(f"--out {args.out} names a {args.out.suffix} file but --format is {args.format}: "
                     f"name it {args.out.with_suffix(suffix[args.format]).name}, or pass the other --format")
    return parser, args


def model_and_variables(args):
    """The model and its variables: the checkpoint's, checked against the model, or a random init."""
    saved, meta = (load_variables(args.checkpoint) if args.checkpoint else (None, {}))
    args.model = args.model or meta.get("model") or meta.get("config", {}).get("model")
    if args.model not in models.names(task="image_classifier"):
        raise CheckpointError(f"checkpoint {args.checkpoint} does not name a zoo classifier "
                              f"(it says {args.model!r}): pass --model NAME")
    normalization = NORMALIZATIONS[meta.get("config", {}).get("normalization", "cifar10")]
    args.mean, args.std = args.mean or normalization[0], args.std or normalization[1]
    if {len(args.mean), len(args.std)} != {args.input_shape[-1]}:  # a default's 3 values for other images
        raise CheckpointError(f"the default --mean and --std have 3 values for {args.input_shape[-1]} channels: "
                              "pass both, one value a channel")
    labels = args.labels.split(",") if args.labels else meta.get("class_names")
    num_classes = args.num_classes or (len(labels) if labels else None)
    if num_classes is None and saved is not None and "fc" in saved["params"]:
        num_classes = saved["params"]["fc"]["kernel"].shape[-1]
    num_classes = num_classes or 10
    if labels is not None and len(labels) != num_classes:
        raise CheckpointError(f"{len(labels)} labels for {num_classes} classes: pass --labels with one name a class")
    model = models.get(args.model, num_classes=num_classes)
    x = jnp.zeros((1, *args.input_shape), jnp.float32)
    try:
        like = jax.eval_shape(model.init, jax.random.key(0), x)
    except (TypeError, ValueError) as e:  # e.g. images too small for the model's pooling
        raise export.ArtifactError(f"--input-shape {','.join(map(str, args.input_shape))}: {args.model} cannot "
                                   f"take such images ({str(e).splitlines()[0]})") from None
    if saved is None:
        variables = model.init(jax.random.key(args.seed), x)
    else:
        if lines := shape_mismatches(leaf_shapes(saved), leaf_shapes(like)):
            raise CheckpointError(f"checkpoint {args.checkpoint} does not fit --model {args.model} with "
                                  f"{num_classes} classes:\n  " + "\n  ".join(lines))
        variables = saved
    return model, variables, labels or [str(i) for i in range(num_classes)]


def why_unchecked(fmt, platforms):
    """Why this process cannot run the artifact to check it (ONNX: onnxruntime, on the CPU), or None."""
    if fmt == "onnx":
        try:
            importlib.import_module("onnxruntime")
        except ImportError:
            return "onnxruntime is not installed (pip install -e '.[onnx]')"
        return None
    if not any(p in platforms for p in export.platforms_here()):
        return f"this {jax.default_backend()} backend is not among --platforms"
    return None


def reference_logits(fn, images, fmt):
    """`fn`'s logits on `images`; for ONNX at full float32 precision, as onnxruntime computes
    on the CPU (a GPU's default TF32 convolutions would differ by more than the check allows),
    and for StableHLO at the default precision the exported program keeps.

    Raises:
      ArtifactError: they are not finite: nothing worth exporting."""
    with jax.default_matmul_precision("highest" if fmt == "onnx" else None):
        expected = np.asarray(jax.jit(fn)(images))
    if not np.isfinite(expected).all():
        raise export.ArtifactError("the model's logits are not finite (NaN or inf in its weights?)")
    return expected


def checker(images, expected, found):
    """A `save` check: the written file's logits on `images` within 1e-4 of the largest
    `expected` one; the difference goes into `found`."""
    def check(path):
        found["difference"] = float(np.max(np.abs(export.load(path)(images) - expected)))
        # float32 reassociation stays far below this; a NaN difference fails it too
        if not found["difference"] <= 1e-4 * max(1.0, float(np.abs(expected).max())):
            raise export.ArtifactError(f"the exported model's logits differ from fnlearn's by "
                                       f"{found['difference']:.2e} on 8 random images: a converter bug. "
                                       "Please report it with the command")
    return check


def main(argv=None):
    parser, args = parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (8, *args.input_shape), np.uint8)
    why, found = why_unchecked(args.format, args.platforms), {}
    try:
        model, variables, labels = model_and_variables(args)
        fn = export.classifier(model.apply, variables, args.mean, args.std)
        meta = {"model": args.model, "labels": labels, "mean": list(args.mean), "std": list(args.std),
                "checkpoint": str(args.checkpoint) if args.checkpoint else None}
        expected = reference_logits(fn, images, args.format)
        check = None if why else checker(images, expected, found)
        size = export.save(args.out, fn, args.input_shape, meta, args.format, args.platforms, check=check)
    except (CheckpointError, export.ArtifactError, export.ExportError) as e:
        sys.exit(f"error: {e}; nothing was written to {args.out}")
    written = f"wrote {args.out} ({args.format}, {size / 2**20:.1f} MiB, {len(labels)} classes)"
    if why:
        print(f"{written}; not checked: {why}")
    else:
        print(f"{written}; max |logits - fnlearn's| on 8 random images: {found['difference']:.2e}")


if __name__ == "__main__":
    main()
