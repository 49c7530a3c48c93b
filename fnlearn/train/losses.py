"""Losses. Computed in float32 whatever the compute dtype of the model."""
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy with integer labels, as `torch.nn.CrossEntropyLoss`.

    Args:
      logits: (B, C) array, any float dtype.
      labels: (B,) integer class ids.
      label_smoothing: mass spread uniformly over all C classes (PyTorch's definition).
    Returns:
      scalar float32 loss.
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def mse(predictions, targets):
    """Mean squared error, as `torch.nn.MSELoss`."""
    diff = predictions.astype(jnp.float32) - targets.astype(jnp.float32)
    return jnp.mean(diff * diff)


def accuracy(logits, labels):
    """Fraction of rows whose argmax equals the label."""
    return jnp.mean(jnp.argmax(logits, -1) == labels)
