"""fnlearn against PyTorch, side by side in one process, on this machine.

    python -m benchmarks                 # every workload
    python -m benchmarks basics          # regression and simple_net
    python -m benchmarks fastnet_train resnet18_infer --repeats 2 --json bench.json

Workloads (same shapes and random data on both sides; the conv nets start from the same weights):
  regression       the seed regression, full-batch Adam                       steps/s
  simple_net       SimpleNet 784-128-10, batch 64, SGD with momentum          steps/s
  cnn              the seed CNN (16x16x3), train step, batch 64               images/s
  fastnet_train    airbench94's net, train step, batch 512, Nesterov SGD      images/s
  resnet18_train   ResNet-18 (CIFAR stem), train step, batch 128              images/s
  resnet18_infer   ResNet-18 (CIFAR stem), inference, batch 256               images/s
  fastnet_epoch    the fast CIFAR recipe on 50,000 random uint8 32x32 images
                   at batch 1024: gather, flip, translate and normalise, step,
                   lookahead. `--epoch-fraction` of its 48 steps is timed
                   (default 0.08: 4 steps; 1.0 for the whole epoch)           images/s

How it times: each side is warmed up first (compilation for fnlearn, kernel
selection for PyTorch), then the best of `--repeats` runs counts (the basics: all
their steps, or more to last at least 0.1 s; cnn: 20 steps; the big nets: 2 steps;
fastnet_epoch: the epoch fraction). The runs of a workload's sides take turns
(PyTorch, fnlearn, PyTorch, ...), so a slow spell of a shared machine hits both
sides, not one. Compile time is reported apart and never counted.

PyTorch runs eagerly in its best CPU mode: the basics in float32; the conv
workloads in float32 channels_last or in bf16 autocast (channels_last), whichever
is faster on a one-step probe. fnlearn runs the conv workloads in float32 and in
bfloat16 (the model built with dtype=bfloat16, params float32), each row against
that one PyTorch number. fnlearn's train steps run as jitted steps, one a call, and
as a compiled run: `lax.scan` over every step of the basics, or over the conv nets'
timed steps, as the CIFAR recipe's `steps_per_execution` does.
ratio = fnlearn_per_s / torch_per_s.

Run it on an idle machine: anything else heavy running skews the ratio (PyTorch's
threads suffer most). `python -m benchmarks.profile` splits the conv train steps by
kind of work.
"""
import json
import os
import platform
import time
from pathlib import Path

import jax

from benchmarks.timing import measure
from benchmarks.workloads import GROUPS, WORKLOADS, fastnet_epoch
from experiments import cli


def print_table(rows):
    """The rows as a fixed-width table; throughputs are per second in each row's unit."""
    head = (f"{'workload':<16}{'mode':<14}{'prec':<6}{'unit':<10}{'torch/s':>11}  {'torch mode':<29}"
            f"{'fnlearn/s':>11}{'ratio':>8}{'compile s':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workload']:<16}{r['mode']:<14}{r['precision']:<6}{r['unit']:<10}{r['torch_per_s']:>11.1f}  "
              f"{r['torch_mode']:<29}{r['fnlearn_per_s']:>11.1f}{r['ratio']:>7.2f}x{r['compile_s']:>11.2f}")


def cpu_model():
    """The CPU's model name (as `lscpu` gives it): a CPU figure means nothing without it."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]}, {os.cpu_count()} cores" if names else platform.processor() or "unknown CPU"


def main(argv=None):
    """Measures the named workloads, prints the table; returns its rows."""
    parser = cli.Parser(prog="python -m benchmarks", description=__doc__, formatter_class=cli.HelpFormatter)
    choices = ", ".join([*WORKLOADS, *GROUPS])
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"workloads or groups: {choices}; none given: every workload")
    parser.add_argument("--json", help="also write the rows to this JSON file (if left out: only the table)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timed runs per measurement; the best counts")
    parser.add_argument("--epoch-fraction", type=cli.fraction, default=0.08,
                        help="fraction in (0, 1] of fastnet_epoch's 48 steps to time, "
                             "rounded to whole recipe calls, at least one")
    args = parser.parse_args(argv)
    # Checked now, not after a run of minutes: the rows are written at the very end.
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
        parser.error(f"--json {args.json}: pass a file path in an existing folder")
    for name in args.names:
        if name not in WORKLOADS and name not in GROUPS:
            parser.error(f"unknown workload {name!r}; choose from {choices}")
    names = dict.fromkeys(n for name in args.names or WORKLOADS for n in GROUPS.get(name, (name,)))
    table = dict(WORKLOADS, fastnet_epoch=fastnet_epoch(args.epoch_fraction))
    import torch

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({cpu_model()}), torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    rows = []
    t_start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        rows.extend(measure(table[name], torch, args.repeats))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all workloads: {time.perf_counter() - t_start:.0f} s\n")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
