"""Gradient tools: accumulation over micro-batches."""
import jax
from jax import lax


def accumulate_gradients(loss_fn, params, batches):
    """Sums loss and gradients over micro-batches, as repeated `loss.backward()` calls do.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      params: the pytree to differentiate.
      batches: a pytree whose leaves are stacked micro-batches, (K, ...).
    Returns:
      (summed loss, summed grads), with grads shaped like params.
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def add(carry, batch):
        loss, grads = grad_fn(params, batch)
        return jax.tree.map(lambda a, b: a + b, carry, (loss, grads)), None

    zero = jax.tree.map(lambda p: jax.numpy.zeros_like(p), (jax.numpy.zeros(()), params))
    (loss, grads), _ = lax.scan(add, zero, batches)
    return loss, grads
