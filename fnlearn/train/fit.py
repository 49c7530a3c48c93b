"""`fit`: training over in-memory arrays, step by step or as one compiled program."""
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlearn import parallel
from fnlearn.train.loop import History, TrainingDiverged, epoch_order, scan_steps
from fnlearn.train.losses import cross_entropy
from fnlearn.train.progress import StepProgress
from fnlearn.train.steps import first_nonfinite, make_eval_step, make_train_step


def _diverged(metrics, step0, state):
    """TrainingDiverged for the first non-finite step in stacked (steps,) metrics, if any."""
    ok = np.asarray(metrics["all_finite"]).reshape(-1)
    if ok.all():
        return None
    i = int(np.argmin(ok))
    finite = jax.tree.map(lambda f: np.asarray(f).reshape(-1)[i], metrics["finite"])
    return TrainingDiverged(step0 + i, first_nonfinite(finite) or "loss", state=state)


def _epoch_means(metrics):
    """`train_*` epoch means of a step's stacked metrics (the finite flags left out)."""
    return {f"train_{k}": v.mean() for k, v in metrics.items() if k not in ("finite", "all_finite")}


def fit(state, train_data, *, epochs, key, batch_size=None, loss_fn=cross_entropy, eval_data=None,
        shuffle=True, clip_norm=None, accumulate=1, check_finite=False, compiled=False, mesh=None,
        fsdp=False, progress=True, log_every=0, log=print):
    """Trains `state` on in-memory arrays; returns `(state, history)`.

    Args:
      state: a `TrainState`.
      train_data: `(x, y)` arrays; the first axis is the example axis.
      epochs: passes over the data.
      key: PRNG key for shuffling; epoch e uses `fold_in(key, e)` (`loop.epoch_order`).
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
    Returns:
      history: a `History`: `train_loss`, `train_grad_norm`, `train_accuracy` for
        classification, `eval_loss` and `eval_accuracy` when `eval_data` is given, and
        `epoch_seconds` (with `compiled`, the whole run's time spread evenly, compile
        excluded; the compile time is then `history["compile_seconds"]`).
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    whole, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    x, y = jax.device_put(tuple(train_data), whole)
    batch_size = batch_size or x.shape[0]
    if x.shape[0] < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {x.shape[0]} training examples")
    parallel.check_divides(mesh, {"batch_size": batch_size}, accumulate)
    state_sharding = parallel.state_sharding(state, mesh, fsdp)
    state = jax.device_put(state, state_sharding)
    train_step = make_train_step(loss_fn, clip_norm=clip_norm, check_finite=check_finite, accumulate=accumulate)
    eval_step = make_eval_step(loss_fn, batch_size)
    steps_per_epoch = x.shape[0] // batch_size
    if eval_data is not None:
        eval_data = jax.device_put(tuple(eval_data), whole)

    def epoch_eval(state):
        if eval_data is None:
            return {}
        return {f"eval_{k}": v for k, v in eval_step(state, eval_data).items()}

    history = History()

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
                carry, m = scan_steps(gathered_step)(carry, epoch_order(key, e, x.shape[0], batch_size, shuffle))
                return carry, (m, _epoch_means(m), epoch_eval(carry[0]))

            (state, _), out = lax.scan(epoch, (state, jnp.array(False)), jnp.arange(epochs))
            return state, out

        t0 = time.perf_counter()
        compiled_run = run.lower(state).compile()
        history["compile_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, (steps_m, epoch_m, eval_m) = jax.block_until_ready(compiled_run(state))
        seconds = (time.perf_counter() - t0) / epochs
        if check_finite and (error := _diverged(steps_m, 0, state)):
            raise error
        for e in range(epochs):
            record(e, {k: v[e] for k, v in {**epoch_m, **eval_m}.items()}, seconds)
        return state, history

    step_fn = jax.jit(lambda state, idx: gathered_step((state, jnp.array(False)), idx), donate_argnums=0,
                      out_shardings=((state_sharding, whole), whole))
    order_fn = jax.jit(epoch_order, static_argnums=(2, 3, 4))
    eval_fn = jax.jit(epoch_eval)
    with StepProgress(epochs * steps_per_epoch, "fit", batch_size, unit="ex", disable=not progress) as bar:
        for e in range(epochs):
            t0 = time.perf_counter()
            order = order_fn(key, e, x.shape[0], batch_size, shuffle)
            ms = []
            for i in range(steps_per_epoch):
                (state, _), m = step_fn(state, order[i])
                if check_finite and not bool(m["all_finite"]):
                    # The step was not applied, so `state` is the last finite state.
                    raise _diverged(jax.tree.map(lambda v: v[None], m), e * steps_per_epoch + i, state)
                ms.append(m)
                bar.dispatched(1, m["loss"])
            stacked = jax.tree.map(lambda *v: jnp.stack(v), *ms)
            metrics = {**_epoch_means(stacked), **eval_fn(state)}
            jax.block_until_ready(metrics)
            record(e, metrics, time.perf_counter() - t0, write=partial(bar.write, log=log))
    return state, history
