"""Where a conv net's train step spends its time, in fnlearn and in PyTorch, side by side.

    python -m benchmarks.profile fastnet            # airbench94's net, batch 512
    python -m benchmarks.profile resnet18 --top 20  # ResNet-18 (CIFAR stem), batch 128
    python -m benchmarks.profile fastnet --steps-per-call 2  # the compiled run's steps
    python -m benchmarks.profile fastnet --precision bf16     # against PyTorch's bf16 autocast

Runs the bench's train step (its workload: the same weights, batch and optimizer;
PyTorch channels_last, in fp32 or in bf16 autocast as fnlearn's `--precision`) a few
times under each framework's own profiler, `jax.profiler` and `torch.profiler`, and
prints milliseconds per step by kind of work, then fnlearn's most expensive XLA ops.
fnlearn's times are wall-clock: the time during which at least one op of that kind was
running. XLA runs independent
ops concurrently (an input gradient beside a kernel gradient), so the kinds can
add up to more than the step; "all ops" counts such overlaps once. PyTorch's are
the profiler's self CPU time per op (its ops run one after another; under the
profiler they add up to more than the unprofiled step). Run it on an idle machine,
as the bench. `--steps-per-call K` profiles fnlearn's compiled run instead: K steps
in one `lax.scan` per call, as the bench's compiled run and the CIFAR recipe run
them; the times are still per step.

Kinds: conv forward / conv backward (XLA convolutions, fnlearn's oneDNN calls, and 1x1
convs run as dots; PyTorch's mkldnn convolutions), layout copies (the transposes XLA:CPU inserts
around a convolution, mostly for kernel gradients; PyTorch's copies, and under bf16
autocast its casts to bf16 as well), batch norm (with fnlearn's oneDNN calls),
other model ops (activations, pooling, loss), optimizer (the update, outside the
model), unattributed (fnlearn's fusions that XLA made without source metadata: in bf16,
mostly the float32 converts XLA:CPU puts around bf16 elementwise work; PyTorch: none).
"""
import dataclasses
import re
import tempfile

import jax

from benchmarks.timing import TORCH_AUTOCAST
from benchmarks.workloads import WORKLOADS
from experiments import cli
from fnlearn.tools.profile import hlo_ops, inner_ops, op_intervals, split_kernels, top_ops, union_ms

# net -> (the bench's workload of its train step, the Flax module in op names)
NETS = {"fastnet": ("fastnet_train", "FastNet"), "resnet18": ("resnet18_train", "ResNet")}
KINDS = ("conv forward", "conv backward", "layout copies", "batch norm", "other model ops", "optimizer",
         "unattributed")


def jax_kind(name, opcode, op_name, model):
    """The kind of work of one XLA instruction (see the module docstring)."""
    # Forward ops come from the model's jvp; XLA's rewrites of gradient convs drop the metadata.
    backward = "transpose(" in op_name or not op_name
    if opcode == "convolution" or (opcode == "dot" and re.search(r"/(\w+_)?conv\d*/", op_name)):
        return "conv backward" if backward else "conv forward"
    if opcode == "custom-call" and name.startswith("fnlearn_onednn_batch_norm"):  # fnlearn.ops.batch_norm
        return "batch norm"
    if opcode == "custom-call" and name.startswith("fnlearn_onednn_"):  # fnlearn.ops.onednn
        return "conv forward" if name.startswith("fnlearn_onednn_forward") else "conv backward"
    if opcode in ("copy", "transpose") or name.startswith("transpose"):
        return "layout copies"
    if not op_name:
        return "unattributed"
    if model not in op_name:
        return "optimizer"
    if re.search(r"/(\w+_)?bn\d*/", op_name):
        return "batch norm"
    return "other model ops"


def jax_profile(step, steps, split):
    """{instruction name: [(start_ns, end_ns), ...]} of `steps` calls of `step()` (a `timing.Carried`);
    `split`: `split_kernels` of its program."""
    jax.block_until_ready(step())  # warm-up
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                out = step()
            jax.block_until_ready(out)
        return op_intervals(trace_dir, split)


def torch_profile(torch, step, steps):
    """{aten op: self CPU ms per step} of `step()` under torch.profiler."""
    step()  # warm-up: oneDNN builds its kernels on the first call
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def torch_kind(op):
    """The kind of work of one PyTorch op (see the module docstring)."""
    if "convolution_backward" in op:
        return "conv backward"
    if "conv" in op:
        return "conv forward"
    if "batch_norm" in op:
        return "batch norm"
    if "copy" in op or "contiguous" in op or "clone" in op:
        return "layout copies"
    if "foreach" in op or "Optimizer" in op or "sgd" in op.lower():
        return "optimizer"
    return "other model ops"


def main(argv=None):
    """Prints the profile; returns {kind: (PyTorch ms, fnlearn ms)} per step."""
    parser = cli.Parser(prog="python -m benchmarks.profile", description=__doc__,
                        formatter_class=cli.HelpFormatter)
    parser.add_argument("net", choices=list(NETS), help="the net to profile: %(choices)s")
    parser.add_argument("--batch", type=cli.positive_int,
                        help="batch size (if left out: the bench's, " + ", ".join(
                            f"{WORKLOADS[w].batch} for {net}" for net, (w, _) in NETS.items()) + ")")
    parser.add_argument("--steps", type=cli.positive_int, default=3, help="profiled steps (after one warm-up)")
    parser.add_argument("--top", type=cli.non_negative_int, default=12, help="fnlearn ops to list")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 on both sides, or fnlearn's bf16 against PyTorch's bf16 autocast")
    parser.add_argument("--steps-per-call", type=cli.positive_int, default=1,
                        help="fnlearn steps per compiled call, in one lax.scan (the bench's compiled run)")
    args = parser.parse_args(argv)
    import torch

    workload_name, model = NETS[args.net]
    workload = WORKLOADS[workload_name]
    workload = dataclasses.replace(workload, batch=args.batch or workload.batch)
    start = workload.setup(torch, workload)
    step, _ = workload.fnlearn_step(start, args.precision, args.steps_per_call)
    hlo = step.compiled.as_text()
    ops = hlo_ops(hlo)
    jax_iv = inner_ops(jax_profile(step, args.steps, split_kernels(hlo)), ops)
    fnlearn_steps = args.steps * args.steps_per_call
    autocast = TORCH_AUTOCAST["bf16_autocast_channels_last" if args.precision == "bf16" else "fp32_channels_last"]
    torch_ms = torch_profile(torch, workload.torch_step(torch, start, autocast), args.steps)

    calls = f", fnlearn {args.steps_per_call} steps a call" if args.steps_per_call > 1 else ""
    print(f"{args.net} train step, batch {workload.batch}, {args.precision}{calls}; ms per step (wall-clock per op)")
    print(f"{'kind':<18}{'PyTorch':>10}{'fnlearn':>10}")
    table = {}
    for kind in KINDS:
        t = sum(ms for op, ms in torch_ms.items() if torch_kind(op) == kind)
        j = union_ms([i for name, iv in jax_iv.items() if jax_kind(name, *ops[name], model) == kind
                      for i in iv]) / fnlearn_steps
        table[kind] = (t, j)
        print(f"{kind:<18}{t:>10.1f}{j:>10.1f}")
    every = union_ms([i for iv in jax_iv.values() for i in iv]) / fnlearn_steps
    print(f"{'all ops':<18}{sum(torch_ms.values()):>10.1f}{every:>10.1f}\n")
    print(f"fnlearn's top {args.top} ops")
    for ms, name, opcode, op_name in top_ops(jax_iv, ops, fnlearn_steps, args.top):
        print(f"{ms:8.1f} ms  {jax_kind(name, opcode, op_name, model):<16} {name:<30} {op_name[-60:]}")
    return table


if __name__ == "__main__":
    main()
