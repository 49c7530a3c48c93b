"""fnlearn against PyTorch, side by side in one process, on this machine.

    python -m benchmarks                 # every workload
    python -m benchmarks basics          # regression and simple_net
    python -m benchmarks fastnet_train resnet18_infer --repeats 2 --json bench.json
    python -m benchmarks cifar_run --data ../shared/data/cifar10-jpeg.tar.gz   # on a GPU: whole runs

Workloads (same shapes and random data on both sides; the conv nets start from the same weights):
  regression       the seed regression, full-batch Adam                       steps/s
  simple_net       SimpleNet 784-128-10, batch 64, SGD with momentum          steps/s
  cnn              the seed CNN (16x16x3), train step, batch 64               images/s
  fastnet_train    airbench94's net, train step, batch 512, Nesterov SGD      images/s
  resnet18_train   ResNet-18 (CIFAR stem), train step, batch 128              images/s
  resnet18_infer   ResNet-18 (CIFAR stem), inference, batch 256               images/s
  yolo_infer       the detector yolo_tiny's network, 128x128, batch 64        images/s
  fastnet_epoch    the fast CIFAR recipe on 50,000 random uint8 32x32 images
                   at batch 1024: gather, flip, translate and normalise, step,
                   lookahead. `--epoch-fraction` of its 48 steps is timed
                   (default 0.08: 4 steps; 1.0 for the whole epoch)           images/s
  cifar_run        the whole CIFAR recipe (airbench94's, `CifarConfig()`): every
                   epoch, then the TTA pass, timed as airbench times itself;
                   the rows carry each side's TTA test accuracy on `--data`'s
                   CIFAR-10 ("random data" without it). On a CPU (a run takes
                   ~40 minutes on 2 cores) it times `--epoch-fraction` of the
                   first epoch instead, with no TTA pass ("part run")         images/s

How it times: each side is warmed up first (compilation for fnlearn, kernel
selection for PyTorch), then the best of `--repeats` runs counts (the basics: all
their steps, or more to last at least 0.1 s; cnn: 20 steps; the big nets: 2 steps;
fastnet_epoch: the epoch fraction; cifar_run: a whole run, its accuracy the mean
over the timed runs). The runs of a workload's sides take turns, each round
timing PyTorch and then each fnlearn mode once, so a slow spell of a shared machine
hits both sides, not one. Each timed run but cifar_run's starts its clock after one
untimed step of its own, so its steps run back to back, as a training loop's do.
Compile time is reported apart and never counted.

Where JAX runs on a GPU and PyTorch has CUDA, both sides run there (PyTorch's
tensors and nets moved once, before any clock starts; each clock stops after
`torch.cuda.synchronize()` or JAX's `block_until_ready`); else both run on the CPU.
PyTorch runs eagerly in its best mode: the basics in float32; the conv
workloads in float32 channels_last or in bf16 autocast (channels_last), and on
CUDA also in fp16 autocast (channels_last) with cuDNN's autotuner on, whichever
is fastest on a one-step probe; `--torch-mode` holds it to one, to compare like
with like (fnlearn's fp32 rows against PyTorch's fp32 where its bf16 is faster).
fnlearn runs the conv workloads in float32 and in bfloat16 (the model built with
dtype=bfloat16, params float32), each row against that one PyTorch number.
fnlearn's train steps run as jitted steps, one a call, and as a compiled run:
`lax.scan` over every step of the basics, or over the conv nets' timed steps, as
the CIFAR recipe's `steps_per_execution` does.
ratio = fnlearn_per_s / torch_per_s. paired: the median over the rounds of
--repeats of each round's ratio (PyTorch's run and fnlearn's side by side); on a
machine whose speed drifts between rounds it varies less than ratio, which may
set the two sides' best runs from different rounds.

Run it on an idle machine: anything else heavy running skews the ratio (PyTorch's
threads suffer most). `python -m benchmarks.profile` splits the conv train steps by
kind of work.
"""
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import jax

from benchmarks.timing import GPU_ONLY_MODES, TORCH_MODES, measure, torch_device
from benchmarks.workloads import GROUPS, WORKLOADS, cifar_run, fastnet_epoch
from experiments import cli
from fnlearn.data import DataError
from fnlearn.ops import onednn


def accuracy_cell(accuracy):
    """A row's accuracy as the table shows it: 4 places, the reason there is none, or blank."""
    return f"{accuracy:.4f}" if isinstance(accuracy, float) else accuracy or ""


def print_table(rows):
    """The rows as a fixed-width table; throughputs are per second in each row's unit.

    The accuracy columns show only where some row has an accuracy (cifar_run's)."""
    accuracies = any(r["torch_accuracy"] is not None for r in rows)
    head = (f"{'workload':<16}{'mode':<14}{'prec':<6}{'unit':<10}{'torch/s':>11}  {'torch mode':<29}"
            f"{'fnlearn/s':>11}{'ratio':>8}{'paired':>8}{'compile s':>11}"
            + f"  {'torch acc':<12}{'fnlearn acc':<12}" * accuracies)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = f"  {accuracy_cell(r['torch_accuracy']):<12}{accuracy_cell(r['fnlearn_accuracy']):<12}"
        print(f"{r['workload']:<16}{r['mode']:<14}{r['precision']:<6}{r['unit']:<10}{r['torch_per_s']:>11.1f}  "
              f"{r['torch_mode']:<29}{r['fnlearn_per_s']:>11.1f}{r['ratio']:>7.2f}x{r['paired_ratio']:>7.2f}x"
              f"{r['compile_s']:>11.2f}"
              + cells * accuracies)


# The vector extensions that decide which convolution kernels oneDNN (both sides') can run.
ISA_FLAGS = {"avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}


def cpu_model():
    """The CPU's model name (as `lscpu` gives it) and its widest vector extensions: a CPU
    figure means nothing without them."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    isa = [name for flag, name in ISA_FLAGS.items() if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    if not names:
        return platform.processor() or "unknown CPU"
    # This process's CPUs, as taskset or a cgroup leaves them (Linux; elsewhere the machine's).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{names[0]}, {cpus} CPUs{', ' + ' '.join(isa) if isa else ''}"


TORCH_MISSING = ('error: the benchmarks time PyTorch beside fnlearn, and torch is not installed: '
                 'pip install -e ".[test]" (torch==2.13.0, a CPU build)')


def main(argv=None):
    """Measures the named workloads, prints the table; returns its rows."""
    parser = cli.Parser(prog="python -m benchmarks", description=__doc__, formatter_class=cli.HelpFormatter)
    choices = ", ".join([*WORKLOADS, *GROUPS])
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"workloads or groups: {choices}; none given: every workload")
    parser.add_argument("--json", help="also write {machine, rows} to this JSON file (if left out: only the table)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timed runs per measurement; the best counts")
    parser.add_argument("--epoch-fraction", type=cli.fraction, default=0.08,
                        help="fraction in (0, 1] of fastnet_epoch's 48 steps to time, "
                             "rounded to whole recipe calls, at least one; on a CPU, cifar_run's too")
    parser.add_argument("--torch-mode", choices=TORCH_MODES,
                        help="time PyTorch's conv workloads in this mode only (if left out: the fastest on a probe)")
    parser.add_argument("--data",
                        help="CIFAR-10 for cifar_run, a folder or .tar.gz of <root>/{train,test}/<class>/*.jpg "
                             "(if left out: random data, and no accuracy)")
    args = parser.parse_args(argv)
    if args.json:  # checked now, not after a run of minutes: the rows are written at the very end
        args.json = cli.check_output_file(parser, "--json", args.json)
    for name in args.names:
        if name not in WORKLOADS and name not in GROUPS:
            parser.error(f"unknown workload {name!r}; choose from {choices}")
    names = dict.fromkeys(n for name in args.names or WORKLOADS for n in GROUPS.get(name, (name,)))
    if args.data and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such folder or archive")
    try:
        import torch
    except ImportError:
        sys.exit(TORCH_MISSING)

    on_gpu = torch_device(torch).type == "cuda"
    if args.torch_mode in GPU_ONLY_MODES and not on_gpu:
        parser.error(f"--torch-mode {args.torch_mode} runs on CUDA only; PyTorch runs on the CPU here")
    dataset = None
    if args.data and "cifar_run" in names:
        from fnlearn.data import load_dataset  # imports TFDS: only when it is needed

        try:  # loaded now: a malformed folder is reported before any workload runs
            dataset = load_dataset(args.data)
        except DataError as e:
            sys.exit(f"error: {e}")
    table = dict(WORKLOADS, fastnet_epoch=fastnet_epoch(args.epoch_fraction),
                 cifar_run=cifar_run(fraction=None if on_gpu else args.epoch_fraction, dataset=dataset))
    torch_on = (f"on {torch.cuda.get_device_name()}" if on_gpu else f"with {torch.get_num_threads()} threads")
    machine = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "cpu": cpu_model(),
               "torch": f"{torch.__version__} {torch_on}", "torch_mode": args.torch_mode or "fastest on a probe",
               "cpu_kernels": onednn.describe()}
    print(f"jax {machine['jax']} on {machine['device']} ({machine['cpu']}), torch {machine['torch']}")
    if machine["cpu_kernels"]:
        print(f"fnlearn's CPU kernels: {machine['cpu_kernels']}")
    if jax.default_backend() == "gpu" and not on_gpu:
        print("warning: JAX runs on the GPU but PyTorch has no CUDA here, so it runs on the CPU: "
              "the ratios compare different hardware")
    rows = []
    t_start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        workload = table[name]
        if args.torch_mode and args.torch_mode in workload.torch_modes:  # the basics run fp32 eager only
            workload = dataclasses.replace(workload, torch_modes=(args.torch_mode,))
        rows.extend(measure(workload, torch, args.repeats))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all workloads: {time.perf_counter() - t_start:.0f} s\n")
    print_table(rows)
    if args.json:  # the machine with the rows: a figure means nothing without it
        cli.write_json(args.json, {"machine": machine, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
