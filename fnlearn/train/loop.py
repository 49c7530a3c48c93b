"""The pieces every training loop is built from: epoch order, K steps in one call,
batched evaluation, the history of a run, and the error for a run that diverged.

`fit` and the recipes each own their loop, as Flax's examples do, and share these.
"""
import jax
import jax.numpy as jnp
import numpy as np


def epoch_order(key, epoch, num_examples, batch_size, shuffle=True):
    """(steps, batch_size) example indices for `epoch`; the last partial batch is dropped.

    The order comes from `fold_in(key, epoch)`, so a resumed or compiled run sees the
    same batches as an unbroken step-by-step one.
    """
    steps = num_examples // batch_size
    order = (jax.random.permutation(jax.random.fold_in(key, epoch), num_examples) if shuffle
             else jnp.arange(num_examples))
    return order[: steps * batch_size].reshape(steps, batch_size)


def scan_steps(step):
    """`run(state, xs) -> (state, metrics)`: `step(state, x)` for each row of `xs` in one `lax.scan`.

    Several steps in one compiled call (Keras's `steps_per_execution`) spare a dispatch
    per step, and XLA reuses one step's scratch memory for the next. Metrics are stacked.
    """
    def run(state, xs):
        return jax.lax.scan(step, state, xs)
    return run


def chunks(steps, size):
    """`range(steps)` cut into consecutive ranges of `size` (the last may be shorter)."""
    return [range(i, min(i + size, steps)) for i in range(0, steps, size)]


def batched(fn, x, batch_size):
    """`fn` applied to `x` (N, ...) `batch_size` examples at a time, in one `lax.map`.

    The last batch is padded with zeros and its padding cut from the outputs, so the
    program has one batch shape whatever N is. `fn` must treat examples independently
    (BatchNorm in inference mode). Returns `fn`'s outputs for all N examples.
    """
    n = x.shape[0]
    batch_size = max(1, min(batch_size, n))  # a batch past N would only be padding
    pad = -n % batch_size
    padded = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    out = jax.lax.map(fn, padded.reshape(-1, batch_size, *x.shape[1:]))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


class History(dict):
    """A run's per-epoch values, one list per name, with the same names everywhere:

    `train_loss`, `train_accuracy`, `train_grad_norm` (epoch means), `eval_loss`,
    `eval_accuracy` (after the epoch), `epoch_seconds`. A dict, so it goes to JSON
    (summary.json, checkpoint metadata) as it is.
    """

    def append(self, values):
        """Adds one epoch's `values` (name -> number)."""
        for name, value in values.items():
            self.setdefault(name, []).append(float(value))

    @property
    def epochs(self):
        """How many epochs it holds."""
        return len(self.get("epoch_seconds", ()))


class TrainingDiverged(FloatingPointError):
    """A step produced NaN or Inf. The message names the step, where it first showed (with
    `--detect-anomaly`, the layer, forward or backward: `anomaly`) and the last good checkpoint;
    `state` is the last finite state, where the loop has it."""

    def __init__(self, step, leaf="loss", checkpoint=None, state=None, epoch=None, anomaly=None, replayed=False):
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        in_epoch = f" (epoch {epoch})" if epoch is not None else ""
        first = f"first in {leaf}"
        if replayed:  # the step was rerun from the last finite state, layer by layer
            first = str(anomaly) if anomaly else f"{first} (its replay from the last finite state stayed finite)"
        super().__init__(f"training diverged: non-finite value at step {step}{in_epoch}: {first}; "
                         f"{where}. Try a lower learning rate")
        self.step, self.leaf, self.checkpoint, self.state, self.anomaly = step, leaf, checkpoint, state, anomaly


def first_false(flags):
    """Index of the first False in an array of per-step flags (any shape, read in order), or None."""
    flags = np.asarray(flags).reshape(-1)
    return None if flags.all() else int(np.argmin(flags))


def first_nonfinite_step(values):
    """Index of the first non-finite entry of a 1-D host array, or None."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(values)))
    return int(bad[0]) if bad.size else None
