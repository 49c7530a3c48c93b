"""`fit`: training over in-memory arrays, step by step or as one compiled program."""
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlearn.train.losses import cross_entropy
from fnlearn.train.progress import StepProgress
from fnlearn.train.steps import NonFiniteError, first_nonfinite, make_eval_step, make_train_step


def epoch_batches(x, y, key, epoch, batch_size, shuffle=True):
    """One epoch of batches, stacked: (steps, batch_size, ...). Drops the last partial batch.

    The order comes from `fold_in(key, epoch)`, so both `fit` modes see the same batches.
    """
    n = x.shape[0]
    steps = n // batch_size
    if shuffle:
        idx = jax.random.permutation(jax.random.fold_in(key, epoch), n)[: steps * batch_size]
    else:
        idx = jnp.arange(steps * batch_size)
    idx = idx.reshape(steps, batch_size)
    return x[idx], y[idx]


def _evaluate_batches(eval_step, state, x, y, batch_size):
    """Mean eval metrics over (x, y), in full batches plus one remainder batch."""
    n = x.shape[0]
    full = n // batch_size * batch_size
    parts, weights = [], []
    if full:
        xb = x[:full].reshape(-1, batch_size, *x.shape[1:])
        yb = y[:full].reshape(-1, batch_size, *y.shape[1:])
        m = lax.map(lambda b: eval_step(state, b), (xb, yb))
        parts.append(jax.tree.map(lambda v: v.mean(0), m))
        weights.append(full)
    if n > full:
        parts.append(eval_step(state, (x[full:], y[full:])))
        weights.append(n - full)
    return jax.tree.map(lambda *vs: sum(v * w for v, w in zip(vs, weights)) / n, *parts)


def _check(metrics, step0, state):
    """Raises NonFiniteError for the first non-finite step in stacked (steps,) metrics."""
    ok = np.asarray(metrics["all_finite"]).reshape(-1)
    if ok.all():
        return
    i = int(np.argmin(ok))
    finite = jax.tree.map(lambda f: np.asarray(f).reshape(-1)[i], metrics["finite"])
    leaf = first_nonfinite(finite) or "loss"
    raise NonFiniteError(step0 + i, leaf, state)


def fit(state, train_data, *, epochs, key, batch_size=None, loss_fn=cross_entropy, eval_data=None,
        shuffle=True, clip_norm=None, check_finite=False, compiled=False, progress=True,
        log_every=0, log=print):
    """Trains `state` on in-memory arrays; returns `(state, history)`.

    Args:
      state: a `TrainState`.
      train_data: `(x, y)` arrays; the first axis is the example axis.
      epochs: passes over the data.
      key: PRNG key for shuffling; epoch e uses `fold_in(key, e)`.
      batch_size: examples per step; None means the whole set (full-batch).
      eval_data: optional `(x, y)`, evaluated after every epoch (`eval_loss`, ...).
      clip_norm, check_finite: see `make_train_step`. With `check_finite`, a
        non-finite step raises `NonFiniteError` naming the step and the first
        non-finite parameter; the error carries the last finite state.
      compiled: run every epoch inside one jitted `lax.scan` (one program, no
        per-step dispatch). Gives the same params as the step-by-step loop.
      log_every: print the epoch's metrics every this many epochs (0: never).
    Returns:
      history: dict of per-epoch lists: `loss`, `grad_norm` (epoch means),
        `accuracy` for classification, `eval_*` when `eval_data` is given, and
        `seconds` (wall-clock of each epoch; with `compiled`, the whole run's time
        spread evenly, compile excluded).
    """
    x, y = (jnp.asarray(a) for a in train_data)
    batch_size = batch_size or x.shape[0]
    if x.shape[0] < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {x.shape[0]} training examples")
    train_step = make_train_step(loss_fn, clip_norm=clip_norm, check_finite=check_finite)
    eval_step = make_eval_step(loss_fn)
    steps_per_epoch = x.shape[0] // batch_size

    def epoch_eval(state):
        if eval_data is None:
            return {}
        m = _evaluate_batches(eval_step, state, *eval_data, batch_size)
        return {f"eval_{k}": v for k, v in m.items()}

    history = {}

    def record(epoch, metrics, seconds, write=log):
        for k, v in metrics.items():
            history.setdefault(k, []).append(float(v))
        history.setdefault("seconds", []).append(seconds)
        if log_every and (epoch + 1) % log_every == 0:
            write(f"epoch {epoch + 1:4d}  " + "  ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()))

    def summarize(m):
        return {k: v.mean() for k, v in m.items() if k not in ("finite", "all_finite")}

    if eval_data is not None:
        eval_data = tuple(jnp.asarray(a) for a in eval_data)

    if compiled:
        @partial(jax.jit, donate_argnums=0)
        def run(state, x, y):
            def epoch(carry, e):
                state, halted = carry
                xb, yb = epoch_batches(x, y, key, e, batch_size, shuffle)

                def step(carry, batch):
                    state, halted = carry
                    new, m = train_step(state, batch)
                    if check_finite:
                        halted = halted | ~m["all_finite"]
                        new = jax.tree.map(lambda a, b: jnp.where(halted, b, a), new, state)
                    return (new, halted), m

                (state, halted), m = lax.scan(step, (state, halted), (xb, yb))
                return (state, halted), (m, summarize(m), epoch_eval(state))

            (state, _), out = lax.scan(epoch, (state, jnp.array(False)), jnp.arange(epochs))
            return state, out

        t0 = time.perf_counter()
        compiled_run = run.lower(state, x, y).compile()
        history["compile_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, (steps_m, epoch_m, eval_m) = jax.block_until_ready(compiled_run(state, x, y))
        seconds = (time.perf_counter() - t0) / epochs
        if check_finite:
            _check(steps_m, 0, state)
        for e in range(epochs):
            record(e, {k: v[e] for k, v in {**epoch_m, **eval_m}.items()}, seconds)
        return state, history

    step_fn = jax.jit(train_step, donate_argnums=0)
    batches_fn = jax.jit(epoch_batches, static_argnums=(4, 5))
    eval_fn = jax.jit(epoch_eval)
    with StepProgress(epochs * steps_per_epoch, "fit", batch_size, unit="ex", disable=not progress) as bar:
        for e in range(epochs):
            t0 = time.perf_counter()
            xb, yb = batches_fn(x, y, key, e, batch_size, shuffle)
            ms = []
            for i in range(steps_per_epoch):
                state, m = step_fn(state, (xb[i], yb[i]))
                if check_finite and not bool(m["all_finite"]):
                    # The step was not applied, so `state` is the last finite state.
                    _check(jax.tree.map(lambda v: v[None], m), e * steps_per_epoch + i, state)
                ms.append(m)
                bar.dispatched(1, m["loss"])
            stacked = jax.tree.map(lambda *v: jnp.stack(v), *ms)
            metrics = {**summarize(stacked), **eval_fn(state)}
            jax.block_until_ready(metrics)
            record(e, metrics, time.perf_counter() - t0, write=partial(bar.write, log=log))
    return state, history
