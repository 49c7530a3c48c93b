"""`fit`: training over in-memory arrays, step by step or as one compiled program."""
import contextlib
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlearn import parallel
from fnlearn.tools.profile import report as profile_report
from fnlearn.train.loop import History, TrainingDiverged, epoch_order, first_false, scan_steps
from fnlearn.train.losses import cross_entropy
from fnlearn.train.progress import StepProgress
from fnlearn.train.steps import find_step_anomaly, first_nonfinite, make_eval_step, make_train_step


def _epoch_means(metrics):
    """`train_*` epoch means of a step's stacked metrics (the finite flags and histograms left out)."""
    return {f"train_{k}": v.mean() for k, v in metrics.items() if k not in ("finite", "all_finite", "histograms")}


def _check_pairs(name, x, y):
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x holds {x.shape[0]} examples and y {y.shape[0]}; they must pair up")


def fit(state, train_data, *, epochs, key, batch_size=None, loss_fn=cross_entropy, eval_data=None,
        shuffle=True, clip_norm=None, accumulate=1, check_finite=False, compiled=False, mesh=None,
        fsdp=False, progress=True, log_every=0, log=print, detect_anomaly=False, summaries=None, profile=None):
    """Trains `state` on in-memory arrays; returns `(state, history)`.

    Args:
      state: a `TrainState`.
      train_data: `(x, y)` arrays; the first axis is the example axis.
      epochs: passes over the data.
      key: PRNG key for shuffling; epoch e uses `fold_in(key, e)` (`loop.epoch_order`), counting
        the epochs a trained `state` made before (`state.step // steps per epoch`).
      batch_size: examples per step; None means the whole set (full-batch).
      eval_data: optional `(x, y)`, evaluated after every epoch, `batch_size` at a time.
      clip_norm, accumulate, check_finite: see `make_train_step`. With `check_finite`, a
        non-finite step raises `TrainingDiverged` naming the step and the first
        non-finite parameter; the error carries the last finite state.
      compiled: run every epoch inside one jitted `lax.scan` (one program, no
        per-step dispatch). Gives the same params as the step-by-step loop.
      mesh: the devices to train on, data parallel: each batch split over them, the
        state replicated (default: every device, `parallel.data_mesh()`). `batch_size`
        must divide by their number.
      fsdp: split the state over the devices instead (`parallel.state_sharding`).
      log_every: print the epoch's metrics every this many epochs (0: never).
      detect_anomaly: `check_finite`, and the step that broke is rerun from the last finite
        state layer by layer (`tools.find_anomaly`): the error names the layer, forward or
        backward, where the first NaN/Inf appeared, and carries that `anomaly`.
      summaries: a `tools.tensorboard.StepSummaries`: every `summaries.every` steps, the step's
        scalars and histograms of the weights and gradients, written as each epoch ends.
      profile: a folder to write a `jax.profiler` trace of one warm step to (with `compiled`,
        of the whole run), whose slowest ops are then logged.
    Returns:
      history: a `History`: `train_loss`, `train_grad_norm`, `train_accuracy` for
        classification, `eval_loss` and `eval_accuracy` when `eval_data` is given, and
        `epoch_seconds` (with `compiled`, the whole run's time spread evenly, compile
        excluded; the compile time is then `history["compile_seconds"]`).
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    whole, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    x, y = jax.device_put(tuple(train_data), whole)
    _check_pairs("train_data", x, y)
    batch_size = batch_size or x.shape[0]
    if x.shape[0] < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {x.shape[0]} training examples")
    parallel.check_divides(mesh, {"batch_size": batch_size}, accumulate)
    state_sharding = parallel.state_sharding(state, mesh, fsdp)
    # A copy, made in its final layout: the steps donate the state, which must not take the
    # caller's arrays with it (device_put onto a mesh reuses the buffer already on its device,
    # even with may_alias=False).
    state = jax.jit(partial(jax.tree.map, jnp.copy), out_shardings=state_sharding)(state)
    check_finite = check_finite or detect_anomaly
    train_step = make_train_step(loss_fn, clip_norm=clip_norm, check_finite=check_finite, accumulate=accumulate,
                                 summaries_every=summaries.every if summaries else 0)
    eval_step = make_eval_step(loss_fn, batch_size)
    steps_per_epoch = x.shape[0] // batch_size
    if eval_data is not None:
        eval_data = jax.device_put(tuple(eval_data), whole)
        _check_pairs("eval_data", *eval_data)

    def epoch_eval(state):
        if eval_data is None:
            return {}
        return {f"eval_{k}": v for k, v in eval_step(state, eval_data).items()}

    history = History()
    step0 = int(state.step)  # the steps `state` has taken already
    # A state trained before goes on with the epochs after its own, so that two calls of
    # one epoch each see the batches one call of two epochs sees.
    first = step0 // steps_per_epoch

    def diverged(finite, i, state):
        """TrainingDiverged for the run's step `i` (0-based), `finite` its per-leaf flags, `state` the last
        finite state."""
        anomaly = None
        if detect_anomaly:
            e, j = divmod(i, steps_per_epoch)
            idx = epoch_order(key, first + e, x.shape[0], batch_size, shuffle)[j]
            anomaly = find_step_anomaly(state, loss_fn, (x[idx], y[idx]))
        return TrainingDiverged(step0 + i, first_nonfinite(finite) or "loss", state=state, anomaly=anomaly,
                                replayed=detect_anomaly)

    def record(epoch, metrics, seconds, write=log):
        history.append({**metrics, "epoch_seconds": seconds})
        if log_every and (epoch + 1) % log_every == 0:
            write(f"epoch {epoch + 1:4d}  " + "  ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))

    def gathered_step(carry, idx):
        """One step on the examples `idx`; with `check_finite`, a halted run keeps its last finite state."""
        state, halted = carry
        new, m = train_step(state, jax.lax.with_sharding_constraint((x[idx], y[idx]), split))
        if check_finite:
            halted = halted | ~m["all_finite"]
            new = jax.tree.map(lambda a, b: jnp.where(halted, b, a), new, state)
        return (new, halted), m

    if compiled:
        @partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, whole))
        def run(state):
            def epoch(carry, e):
                carry, m = scan_steps(gathered_step)(carry, epoch_order(key, first + e, x.shape[0], batch_size,
                                                                        shuffle))
                return carry, (m, _epoch_means(m), epoch_eval(carry[0]))

            (state, _), out = lax.scan(epoch, (state, jnp.array(False)), jnp.arange(epochs))
            return state, out

        t0 = time.perf_counter()
        compiled_run = run.lower(state).compile()
        history["compile_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with jax.profiler.trace(str(profile), create_perfetto_trace=True) if profile else contextlib.nullcontext():
            state, (steps_m, epoch_m, eval_m) = jax.block_until_ready(compiled_run(state))
        seconds = (time.perf_counter() - t0) / max(epochs, 1)
        if check_finite and (bad := first_false(steps_m["all_finite"])) is not None:
            raise diverged(jax.tree.map(lambda f: np.asarray(f).reshape(-1)[bad], steps_m["finite"]), bad, state)
        for e in range(epochs):
            record(e, {k: v[e] for k, v in {**epoch_m, **eval_m}.items()}, seconds)
        if summaries:
            summaries(step0 + 1, jax.device_get(steps_m))
        if profile:
            log(profile_report(profile, compiled_run.as_text(), epochs * steps_per_epoch, step0 + 1))
        return state, history

    step_fn = jax.jit(lambda state, idx: gathered_step((state, jnp.array(False)), idx), donate_argnums=0,
                      out_shardings=((state_sharding, whole), whole))
    order_fn = jax.jit(epoch_order, static_argnums=(2, 3, 4))
    eval_fn = jax.jit(epoch_eval)
    traced = min(1, epochs * steps_per_epoch - 1) if profile else None  # the second step: a warm program
    with StepProgress(epochs * steps_per_epoch, "fit", batch_size, unit="ex", disable=not progress) as bar:
        for e in range(epochs):
            t0 = time.perf_counter()
            order = order_fn(key, first + e, x.shape[0], batch_size, shuffle)
            ms = []
            for i in range(steps_per_epoch):
                with jax.profiler.trace(str(profile), create_perfetto_trace=True) if (
                        e * steps_per_epoch + i == traced) else contextlib.nullcontext():
                    (state, _), m = step_fn(state, order[i])
                    if e * steps_per_epoch + i == traced:
                        jax.block_until_ready(m)
                if check_finite and not bool(m["all_finite"]):
                    # The step was not applied, so `state` is the last finite state.
                    raise diverged(m["finite"], e * steps_per_epoch + i, state)
                ms.append(m)
                bar.dispatched(1, m["loss"])
            stacked = jax.tree.map(lambda *v: jnp.stack(v), *ms)
            metrics = {**_epoch_means(stacked), **eval_fn(state)}
            jax.block_until_ready(metrics)
            record(e, metrics, time.perf_counter() - t0, write=partial(bar.write, log=log))
            if summaries:
                summaries(step0 + e * steps_per_epoch + 1, jax.device_get(stacked))
    if profile and epochs * steps_per_epoch:
        hlo = step_fn.lower(state, order[0]).compile().as_text()
        log(profile_report(profile, hlo, 1, step0 + traced + 1))
    return state, history
