"""How the bench times a workload: one `Workload` description, one `measure` that runs both sides.

Each side is warmed up first (compilation for fnlearn, kernel selection for PyTorch);
then the best of `repeats` timed runs counts, the two sides' runs taking turns
(PyTorch, fnlearn, fnlearn, ..., PyTorch, ...), so a slow spell of a shared machine hits
both sides, not one. Compile time is reported apart and never counted.
"""
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator
from functools import partial

import jax
import jax.numpy as jnp

# fnlearn's precisions, as model fields (float32 is every model's default; the basics have no dtype).
PRECISIONS = {"fp32": {}, "bf16": {"dtype": jnp.bfloat16}}
# PyTorch's eager CPU modes, by whether they run under bf16 autocast; the conv nets run channels_last.
TORCH_BF16 = {"fp32_eager": False, "fp32_channels_last": False, "bf16_autocast_channels_last": True}
TORCH_MODES = ("fp32_channels_last", "bf16_autocast_channels_last")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One workload of the table: what each side runs, and how much of it a timed run does.

    `setup(torch, workload)` makes what both sides start from (random data, initial
    weights). From it, `torch_step(torch, start, bf16)` and `fnlearn_step(start, precision,
    steps_per_call)` build one side's `step()` on a fresh model; fnlearn's builder also
    returns its compile seconds.
    """
    name: str
    unit: str  # "steps/s", or "images/s" (a step is `batch` images)
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


def seconds_of(step, calls=1):
    """Wall-clock seconds of `calls` calls of `step()`, waiting for JAX's asynchronous results."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = step()
    jax.block_until_ready(out)  # torch has already finished
    return time.perf_counter() - t0


def best_rates(runs, repeats):
    """Items per second of each run: the best of `repeats` rounds, each round timing every run once, in turn.

    Args:
      runs: list of `(time_run, items)`: `time_run()` returns the seconds of a run of `items` items.
    """
    times = [[time_run() for time_run, _ in runs] for _ in range(repeats)]
    return [items / min(t[i] for t in times) for i, (_, items) in enumerate(runs)]


def timed_run(workload, step, steps_per_call, seconds_per_call=None):
    """`(time_run, items)` for `best_rates`: a run makes `workload.steps` steps, or more to last `min_seconds`."""
    calls = workload.steps // steps_per_call
    if workload.min_seconds:
        calls = max(calls, math.ceil(workload.min_seconds / seconds_per_call))
    return partial(seconds_of, step, calls), calls * steps_per_call * workload.items_per_step


def measure(workload: Workload, torch, repeats: int) -> Iterator[dict]:
    """Times `workload` on both sides, their runs taking turns; yields its rows of the table.

    PyTorch runs in the faster of `workload.torch_modes` on a one-step probe (neither mode
    can be assumed: bf16 autocast speeds up one net and slows another), and every fnlearn
    (mode, precision) is measured against that one PyTorch number.
    Rows: workload, mode, precision, unit, torch_per_s, torch_mode, fnlearn_per_s,
    ratio (fnlearn_per_s / torch_per_s) and compile_s.
    """
    w = workload
    start = w.setup(torch, w)
    probes = []
    for mode in w.torch_modes:
        step = w.torch_step(torch, start, TORCH_BF16[mode])
        step()  # warm-up: oneDNN builds its kernels on the first call
        probes.append((seconds_of(step), mode, step))
    seconds, torch_mode, torch_step = min(probes, key=lambda probe: probe[0])
    runs, labels = [timed_run(w, torch_step, 1, seconds)], []
    for mode, steps_per_call in w.modes:
        for precision in w.precisions:
            step, compile_s = w.fnlearn_step(start, precision, steps_per_call)
            seconds_of(step)  # warm-up: the first run allocates its buffers
            seconds = seconds_of(step) if w.min_seconds else None
            runs.append(timed_run(w, step, steps_per_call, seconds))
            labels.append((mode, precision, compile_s))
    torch_per_s, *rates = best_rates(runs, repeats)
    for (mode, precision, compile_s), per_s in zip(labels, rates):
        yield {"workload": w.name, "mode": mode, "precision": precision, "unit": w.unit,
               "torch_per_s": torch_per_s, "torch_mode": torch_mode, "fnlearn_per_s": per_s,
               "ratio": per_s / torch_per_s, "compile_s": compile_s}
