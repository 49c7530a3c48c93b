"""How the bench times a workload: one `Workload` description, one `measure` that runs both sides.

Each side is warmed up first (compilation for fnlearn, kernel selection for PyTorch);
then the best of `repeats` timed runs counts, the two sides' runs taking turns
(PyTorch, fnlearn, fnlearn, ..., PyTorch, ...), so a slow spell of a shared machine hits
both sides, not one; each run's clock starts after an untimed step (`timed_run`). Where
such spells come and go between rounds, the best runs of the two sides may come from
different rounds; the paired ratio, each round's ratio and their median, does not mix them.
Compile time is reported apart and never counted.

Both sides run on one kind of device: JAX's default backend, and PyTorch on CUDA where
JAX runs on a GPU and PyTorch has CUDA (`torch_device`), else both on the CPU.
"""
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial

import jax
import jax.numpy as jnp

# fnlearn's precisions, as model fields (float32 is every model's default; the basics have no dtype).
PRECISIONS = {"fp32": {}, "bf16": {"dtype": jnp.bfloat16}}
# PyTorch's eager modes, by the dtype they autocast to (None: float32); the conv nets run channels_last.
TORCH_AUTOCAST = {"fp32_eager": None, "fp32_channels_last": None, "bf16_autocast_channels_last": "bfloat16",
                  "fp16_autocast_channels_last": "float16"}
TORCH_MODES = ("fp32_channels_last", "bf16_autocast_channels_last", "fp16_autocast_channels_last")
# A CPU has no fast float16 arithmetic: these modes are probed on CUDA only.
GPU_ONLY_MODES = ("fp16_autocast_channels_last",)


def torch_device(torch):
    """The device PyTorch runs on: CUDA where JAX runs on a GPU and PyTorch has CUDA, else the CPU.

    On CUDA it also turns on cuDNN's autotuner (`cudnn.benchmark`), PyTorch's best GPU mode:
    the warm-up call picks each conv's fastest kernel.
    """
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def torch_finish(torch):
    """`finish(output)` for `seconds_of` on PyTorch's steps: waits for CUDA's queued work (the CPU's is done)."""
    if torch_device(torch).type == "cuda":
        return lambda _: torch.cuda.synchronize()
    return jax.block_until_ready


@dataclasses.dataclass(frozen=True)
class Workload:
    """One workload of the table: what each side runs, and how much of it a timed run does.

    `setup(torch, workload)` makes what both sides start from (random data, initial
    weights). From it, `torch_step(torch, start, autocast)` (autocast: a dtype name of
    `TORCH_AUTOCAST`, or None) and `fnlearn_step(start, precision, steps_per_call)` build one
    side's `step()` on a fresh model; fnlearn's builder also returns its compile seconds.
    With `accuracy`, a step is a whole training run and returns its test accuracy (a float,
    or a few words saying why it has none), which the rows carry.
    """
    name: str
    unit: str  # "steps/s", or "images/s" (a step is `batch` images; a run step, the run's training images)
    batch: int
    steps: int  # steps a timed run makes, on each side
    setup: Callable
    torch_step: Callable
    fnlearn_step: Callable
    modes: tuple[tuple[str, int], ...]  # fnlearn's (mode, steps per call), each in every precision
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    torch_modes: tuple[str, ...] = TORCH_MODES  # PyTorch runs in the fastest of these
    # A run of milliseconds swings with any slow moment of a shared machine: such runs
    # repeat their steps until they last this long.
    min_seconds: float = 0.0
    accuracy: bool = False  # step() returns a run's test accuracy

    def __post_init__(self):
        if uneven := [k for _, k in self.modes if self.steps % k]:
            raise ValueError(f"{self.name}: {self.steps} steps are no whole number of calls of {uneven} steps")

    @property
    def items_per_step(self):
        return self.batch if self.unit == "images/s" else 1


class Carried:
    """`step()`: `compiled(state, inputs) -> (state, metrics)` on the carried state and the next inputs, in turn.

    The first call donates `state`. `compiled` is kept for `benchmarks.profile`, which reads its HLO.
    """

    def __init__(self, compiled, state, inputs):
        self.compiled, self.state, self._inputs = compiled, state, itertools.cycle(inputs)

    def __call__(self):
        self.state, metrics = self.compiled(self.state, next(self._inputs))
        return self.state, metrics


def compile_timed(fn, *example, donate=True):
    """`fn` jitted (its first argument donated) and compiled for `example`; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*example).compile()
    return compiled, time.perf_counter() - t0


def seconds_of(step, calls=1, finish=jax.block_until_ready, lead_in=0):
    """Wall-clock seconds of `calls` calls of `step()`, the clock stopped once `finish(last output)`
    has waited for the asynchronous work (JAX's; PyTorch's on CUDA: `torch_finish`). The clock
    starts after `lead_in` untimed calls."""
    for _ in range(lead_in):
        finish(step())
    t0 = time.perf_counter()
    for _ in range(calls):
        out = step()
    finish(out)
    return time.perf_counter() - t0


def round_rates(runs, repeats):
    """Items per second of each run in each of `repeats` rounds, each round timing every run once, in turn.

    Args:
      runs: list of `(time_run, items)`: `time_run()` returns the seconds of a run of `items` items.
    Returns:
      rates[round][run].
    """
    return [[items / time_run() for time_run, items in runs] for _ in range(repeats)]


def best_rates(rounds):
    """Items per second of each run: its best round of `round_rates`'s."""
    return [max(column) for column in zip(*rounds)]


def timed_run(workload, step, steps_per_call, seconds_per_call=None, finish=jax.block_until_ready):
    """`(time_run, items)` for `round_rates`: a run makes `workload.steps` steps, or more to last `min_seconds`.

    The clock starts after one untimed call, so the timed steps run back to back, as a
    training loop's do, not as the first step after the other side's run: on a VM that hands
    freed memory back to its host, that step pays to fault it in again (docs/performance.md).
    A whole run (`workload.accuracy`) starts cold, as a user's does.
    """
    calls = workload.steps // steps_per_call
    if workload.min_seconds:
        calls = max(calls, math.ceil(workload.min_seconds / seconds_per_call))
    return (partial(seconds_of, step, calls, finish=finish, lead_in=0 if workload.accuracy else 1),
            calls * steps_per_call * workload.items_per_step)


class Recorded:
    """`step()` that keeps what each call returned, in `outputs` (the runs' accuracies)."""

    def __init__(self, step):
        self.step, self.outputs = step, []

    def __call__(self):
        self.outputs.append(self.step())
        return self.outputs[-1]


def mean_accuracy(outputs):
    """The mean of the runs' accuracies, or the reason they have none (the first run's words)."""
    if any(isinstance(a, str) for a in outputs):
        return next(a for a in outputs if isinstance(a, str))
    return sum(outputs) / len(outputs)


def measure(workload: Workload, torch, repeats: int) -> Iterator[dict]:
    """Times `workload` on both sides, their runs taking turns; yields its rows of the table.

    PyTorch runs in the fastest of `workload.torch_modes` on a one-step probe (none can be
    assumed: bf16 autocast speeds up one net and slows another; the fp16 modes are probed
    on CUDA only), and every fnlearn (mode, precision) is measured against that one PyTorch
    number.
    Rows: workload, mode, precision, unit, torch_per_s, torch_mode, fnlearn_per_s,
    ratio (fnlearn_per_s / torch_per_s), paired_ratio (the median over rounds of fnlearn's
    rate over PyTorch's in the same round), compile_s, and torch_accuracy and fnlearn_accuracy
    (with `workload.accuracy`: the timed runs' mean, or why there is none; else None).
    """
    w = workload
    start = w.setup(torch, w)
    finish = torch_finish(torch)
    on_gpu = torch_device(torch).type == "cuda"
    probes = []
    for mode in w.torch_modes:
        if mode in GPU_ONLY_MODES and not on_gpu:
            continue
        step = w.torch_step(torch, start, TORCH_AUTOCAST[mode])
        finish(step())  # warm-up (oneDNN or cuDNN's autotuner picks its kernels), done before the probe starts
        probes.append((seconds_of(step, finish=finish), mode, step))
    seconds, torch_mode, torch_step = min(probes, key=lambda probe: probe[0])
    steps = [Recorded(torch_step) if w.accuracy else torch_step]
    runs, labels = [timed_run(w, steps[0], 1, seconds, finish)], []
    for mode, steps_per_call in w.modes:
        for precision in w.precisions:
            step, compile_s = w.fnlearn_step(start, precision, steps_per_call)
            seconds_of(step)  # warm-up: the first run allocates its buffers
            seconds = seconds_of(step) if w.min_seconds else None
            steps.append(Recorded(step) if w.accuracy else step)
            runs.append(timed_run(w, steps[-1], steps_per_call, seconds))
            labels.append((mode, precision, compile_s))
    rounds = round_rates(runs, repeats)
    torch_per_s, *rates = best_rates(rounds)
    # Each round's ratio: runs side by side meet the same spell of a noisy machine.
    paired = [statistics.median(r[i] / r[0] for r in rounds) for i in range(1, len(runs))]
    torch_accuracy, *accuracies = [mean_accuracy(s.outputs) if w.accuracy else None for s in steps]
    for (mode, precision, compile_s), per_s, ratio, accuracy in zip(labels, rates, paired, accuracies):
        yield {"workload": w.name, "mode": mode, "precision": precision, "unit": w.unit,
               "torch_per_s": torch_per_s, "torch_mode": torch_mode, "fnlearn_per_s": per_s,
               "ratio": per_s / torch_per_s, "paired_ratio": ratio, "compile_s": compile_s,
               "torch_accuracy": torch_accuracy, "fnlearn_accuracy": accuracy}
