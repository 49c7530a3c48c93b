"""TensorBoard every N steps: `add_scalar` and `add_histogram`'s analogue for a jitted loop.

A train step built with `make_train_step(summaries_every=N)` adds to its metrics, at every
N-th step, `histogram_stats` of the new weights and of the step's gradients: a few numbers
and 30 bucket counts a tensor, computed inside the step (under a `lax.cond`, so the other
steps skip it), where a copy of every gradient leaving the device would cost far more.
`StepSummaries` writes them, with the step's loss, accuracy, gradient norm and learning
rates, when the loop reads its metrics back.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fnlearn.pytrees import path_name

BINS = 30


def histogram_stats(tree, bins=BINS):
    """`{leaf path: {"min", "max", "num", "sum", "sum_squares", "counts" (bins,)}}`, float32, for
    TensorBoard's histograms; the buckets split [min, max] evenly. Call it inside jit."""
    def stats(a):
        x = a.astype(jnp.float32).ravel()
        low, high = jnp.min(x), jnp.max(x)
        width = jnp.where(high > low, (high - low) / bins, 1.0)
        bucket = jnp.clip(jnp.floor((x - low) / width), 0, bins - 1).astype(jnp.int32)
        return {"min": low, "max": high, "num": jnp.float32(x.size), "sum": jnp.sum(x),
                "sum_squares": jnp.sum(x * x), "counts": jnp.bincount(bucket, length=bins).astype(jnp.float32)}

    return {path_name(keys): stats(a) for keys, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def every_nth_step(step, every, weights, grads):
    """`{"weights": ..., "gradients": ...}` histogram stats when `step` (1-based) is a multiple of
    `every`, zeros otherwise: one shape for every step, so a `lax.scan` can stack them."""
    def compute():
        return {"weights": histogram_stats(weights), "gradients": histogram_stats(grads)}

    def skip():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))

    return jax.lax.cond(step % every == 0, compute, skip)


class StepSummaries:
    """Writes a loop's per-step metrics to a `fnlearn.report.TensorBoardWriter` every `every` steps.

    Scalars `step/loss`, `step/accuracy`, `step/grad_norm` (before clipping) and `step/<rate>` for
    each of `learning_rates` (`{name: fn(step)}`, the rate the optimizer applied at that 1-based step);
    each gradient's `grad_norm/<leaf>`, `grad_mean/<leaf>` and `grad_max_abs/<leaf>` (from its
    histogram's figures); histograms `weights/<leaf>` (the weights the step's update made, before a
    recipe's lookahead sync) and `gradients/<leaf>` (a step whose values are not finite has none:
    TensorBoard cannot draw them).
    """

    def __init__(self, writer, every, learning_rates=None):
        self.writer, self.every, self.learning_rates = writer, every, learning_rates or {}

    def __call__(self, first_step, metrics, learning_rates=None):
        """Writes the steps of `metrics` (host arrays stacked over steps; step `first_step` is row 0).
        With no writer (the other processes of a multi-process run) it writes nothing: every process
        runs the same step program, and one writes."""
        if self.writer is None:
            return
        rates = {**self.learning_rates, **(learning_rates or {})}
        n = len(np.asarray(metrics["loss"]).reshape(-1))
        for i in range(n):
            step = first_step + i
            if step % self.every:
                continue
            record = {f"step/{k}": np.asarray(metrics[k]).reshape(n)[i]
                      for k in ("loss", "accuracy", "grad_norm") if k in metrics}
            record.update({f"step/{name}": fn(step) for name, fn in rates.items()})
            if "grad_norm" not in record and "gradients" in metrics.get("histograms", {}):
                # The step skipped its own norm pass (the recipe's): the same figure from the histograms.
                gradients = metrics["histograms"]["gradients"].values()
                record["step/grad_norm"] = np.sqrt(sum(np.asarray(g["sum_squares"]).reshape(n)[i] for g in gradients))
            self.writer.scalars(step, record)
            for kind, leaves in metrics.get("histograms", {}).items():
                for name, stats in leaves.items():
                    row = {k: np.asarray(v).reshape(n, -1)[i].squeeze() for k, v in stats.items()}
                    if kind == "gradients":  # `grad_stats`' figures, per layer
                        self.writer.scalars(step, {f"grad_norm/{name}": np.sqrt(row["sum_squares"]),
                                                   f"grad_mean/{name}": row["sum"] / row["num"],
                                                   f"grad_max_abs/{name}": max(abs(row["min"]), abs(row["max"]))})
                    if np.isfinite(row["min"]) and np.isfinite(row["max"]):
                        self.writer.histogram(step, f"{kind}/{name}", row)
        self.writer.flush()
