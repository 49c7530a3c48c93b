"""Pure train and eval steps, and the finite-value check (`detect_anomaly`'s analogue)."""
import jax
import jax.numpy as jnp
import optax

from fnlearn.pytrees import leaf_paths
from fnlearn.tools.anomaly import find_anomaly
from fnlearn.tools.tensorboard import every_nth_step
from fnlearn.train.loop import batched
from fnlearn.train.losses import accuracy, cross_entropy
from fnlearn.train.precision import LossScale


def first_nonfinite(finite_tree, prefix="params"):
    """Name of the first False leaf of a tree of booleans (host values), or None."""
    for name, ok in zip(leaf_paths(finite_tree), jax.tree.leaves(finite_tree)):
        if not bool(ok):
            return f"{prefix}/{name}"
    return None


def _all_finite(tree):
    return jax.tree.map(lambda a: jnp.all(jnp.isfinite(a)), tree)


def _forward(state, params, x, train):
    """Model output and new batch stats; `train=` is passed only to BatchNorm models."""
    variables = {**state.variables, "params": params}
    if state.batch_stats is None:
        return state.apply_fn(variables, x), None
    if not train:
        return state.apply_fn(variables, x, train=False), None
    out, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]


def _classification(out, y):
    return (hasattr(out, "ndim") and hasattr(y, "ndim") and out.ndim == 2 and y.ndim == 1
            and jnp.issubdtype(y.dtype, jnp.integer))


def _micro_batches(batch, k):
    """(B, ...) leaves as (k, B/k, ...): micro-batch i holds examples i, i + k, i + 2k, ..., so
    a batch split over devices along B gives every device a share of every micro-batch."""
    def split(a):
        return jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _schedules_from(source, opt_state):
    """`opt_state` with its schedule states (optax's `ScaleByScheduleState`: the counts learning-rate
    schedules read) taken from `source`, an optimizer state of the same structure."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda kept, new: new if is_schedule(kept) else kept, opt_state, source,
                        is_leaf=is_schedule)


def make_train_step(loss_fn=cross_entropy, *, clip_norm=None, check_finite=False, grad_norm=True, accumulate=1,
                    summaries_every=0):
    """Builds a pure `train_step(state, (x, y)) -> (state, metrics)`.

    Jit it once, outside the loop: `jax.jit(train_step, donate_argnums=0)`.

    Args:
      loss_fn: `loss_fn(model_output, y) -> scalar`, a mean over the batch, or `(scalar, terms)`,
        a dict of the loss's parts (a detector's box, objectness and class terms), which the
        metrics then carry.
      clip_norm: if set, gradients are scaled so their global norm is at most this
        (`torch.nn.utils.clip_grad_norm_`); metrics report the norm before clipping.
      check_finite: if True, a step whose loss, gradients or new params hold NaN/Inf
        is not applied, and metrics carry `finite`, a per-parameter tree of flags,
        plus `all_finite`, for `fit` to raise `TrainingDiverged` naming the leaf.
      grad_norm: if True, metrics carry `grad_norm`, the gradients' global norm. It
        costs one more pass over every gradient, a visible share of a small MLP's
        step on a CPU. Clipping computes it either way.
      accumulate: split the batch into this many micro-batches, run one after another
        in a `lax.scan`, and make one update from their mean gradient: the activation
        memory of B/accumulate, the update of the whole batch for a model without batch
        statistics. BatchNorm normalises each micro-batch by its own statistics and
        updates its running averages once per micro-batch, as K PyTorch forward passes
        would. A scan rather than `optax.MultiSteps`, so the step count, the schedule
        and anything else keyed to the update (lookahead) stay those of batch B.
      summaries_every: if N > 0, metrics carry `histograms` of the new weights and of the
        gradients (before clipping), computed at every N-th step (`tools.tensorboard.every_nth_step`).
    With `state.loss_scale` (float16, `precision.LossScale`), the loss is scaled before the
    backward pass, the gradients unscaled, and a step whose gradients overflowed skipped (its
    params, optimizer state and statistics kept; its step count and learning-rate schedules
    advanced, as PyTorch's scheduler steps on).
    Returns:
      metrics: `loss`, `grad_norm` (if asked for), `accuracy` for integer-label classification,
        the loss's terms if it returns them, and with a loss scale `loss_scale` (the one this
        step used) and `skipped`.
    """
    def gradients(state, batch):
        """`(loss, grads, new batch stats, further metrics)` for one (micro-)batch: the accuracy for
        classification, the loss's terms where it returns them; with a loss scale, the gradients of
        the scaled loss, scaled back."""
        x, y = batch
        scale = 1.0 if state.loss_scale is None else state.loss_scale.scale

        def objective(params):
            out, stats = _forward(state, params, x, train=True)
            loss = loss_fn(out, y)
            loss, terms = loss if isinstance(loss, tuple) else (loss, {})
            return loss * scale, (loss, terms, out, stats)

        (_, (loss, terms, out, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        if state.loss_scale is not None:
            grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
        extra = {**terms, "accuracy": accuracy(out, y)} if _classification(out, y) else terms
        return loss, grads, stats, extra

    def accumulated(state, batch):
        def micro(carry, batch):
            stats, total = carry
            loss, grads, stats, extra = gradients(state.replace(batch_stats=stats), batch)
            return (stats, jax.tree.map(jnp.add, total, (loss, grads, extra))), None

        micro_batches = _micro_batches(batch, accumulate)
        first = jax.tree.map(lambda a: a[0], micro_batches)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(gradients, state, first))
        (stats, total), _ = jax.lax.scan(micro, (state.batch_stats, (zeros[0], zeros[1], zeros[3])), micro_batches)
        loss, grads, extra = jax.tree.map(lambda t: t / accumulate, total)
        return loss, grads, stats, extra

    def train_step(state, batch):
        loss, grads, stats, extra = (gradients if accumulate == 1 else accumulated)(state, batch)
        metrics, raw_grads = {"loss": loss}, grads
        if grad_norm or clip_norm is not None:
            norm = optax.tree.norm(grads)
            if grad_norm:
                metrics["grad_norm"] = norm
            if clip_norm is not None:
                scale = jnp.minimum(1.0, clip_norm / (norm + 1e-6))
                grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        new_state = applied = state.apply_gradients(grads, batch_stats=stats)
        metrics.update(extra)
        # Judged before clipping: a NaN gradient makes the global norm, every clipped gradient
        # and so every updated param NaN.
        grads_ok = _all_finite(raw_grads)
        grads_finite = jnp.all(jnp.stack(jax.tree.leaves(grads_ok)))
        if state.loss_scale is not None:
            # GradScaler's rule: a step whose gradients overflowed is skipped and the scale adjusts.
            # The step count and the learning-rate schedules' counts still move on, as in PyTorch's
            # loop, where `scheduler.step()` runs whether `scaler.step` skipped or not, so the rate
            # and anything keyed to the step (lookahead's last sync) come at their step.
            new_state = jax.tree.map(lambda new, old: jnp.where(grads_finite, new, old), new_state, state)
            new_state = new_state.replace(step=state.step + 1, loss_scale=state.loss_scale.adjust(grads_finite),
                                          opt_state=_schedules_from(applied.opt_state, new_state.opt_state))
            metrics.update(loss_scale=state.loss_scale.scale, skipped=~grads_finite)
        if summaries_every:
            metrics["histograms"] = every_nth_step(state.step + 1, summaries_every, new_state.params, raw_grads)
        if check_finite:
            # Under a loss scale an overflow is skipped, not a divergence, unless the scale is at
            # its floor (`LossScale.diverged`).
            # Without one, the leaves named are the gradients' where one is not finite, else the params'.
            scaled = state.loss_scale is not None
            finite = _all_finite(new_state.params) if scaled else jax.tree.map(
                lambda g, p: g & (~grads_finite | p), grads_ok, _all_finite(new_state.params))
            ok = jnp.all(jnp.stack(jax.tree.leaves(finite)))
            ok &= ~LossScale.diverged(state.loss_scale.scale, ~grads_finite) if scaled else jnp.isfinite(loss)
            new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
            metrics.update(finite=finite, all_finite=ok)
        return new_state, metrics

    return train_step


def find_step_anomaly(state, loss_fn, batch):
    """Where the first NaN/Inf of a training step of `state` on `batch` (x, y) appears: the forward
    and backward pass of `loss_fn` through `state.apply_fn`, checked layer by layer
    (`tools.find_anomaly`). Returns an `Anomaly`, or None if the pass stays finite.

    The pass is one over the whole batch, without a loss scale: a step that accumulated
    micro-batches normalised each by its own BatchNorm statistics, and a float16 step scaled
    its loss, so such a step's NaN may not recur here (the error then says the replay stayed finite)."""
    state = jax.device_get(state)  # the pass runs on one device (see `find_anomaly`)

    def loss(params, x, y):
        loss = loss_fn(_forward(state, params, x, train=True)[0], y)
        return loss[0] if isinstance(loss, tuple) else loss  # a loss with its terms

    return find_anomaly(loss, state.variables, *batch)


def make_eval_step(loss_fn=cross_entropy, batch_size=None):
    """Builds a pure `eval_step(state, (x, y)) -> metrics` (BatchNorm in inference mode).

    With `batch_size`, the model sees `batch_size` examples at a time (`loop.batched`),
    so a whole evaluation set is one call; the loss is over every example.
    """
    def eval_step(state, batch):
        x, y = batch

        def predict(xb):
            return _forward(state, state.params, xb, train=False)[0]

        out = predict(x) if batch_size is None else batched(predict, x, batch_size)
        loss = loss_fn(out, y)
        loss, terms = loss if isinstance(loss, tuple) else (loss, {})
        metrics = {"loss": loss, **terms}
        if _classification(out, y):
            metrics["accuracy"] = accuracy(out, y)
        return metrics

    return eval_step
