"""Optimizers and learning-rate schedules by name, as optax chains."""
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear", "triangular", "warmup_cosine")


def make_schedule(name, learning_rate, total_steps=None, warmup_steps=0, peak_at=0.2, end=0.0):
    """A learning-rate schedule by name.

    Args:
      name: one of `SCHEDULES`. "triangular" is airbench's (`legacy/airbench94.py`, `get_lr`):
        it rises linearly from 0.2·lr to lr over the first int(`peak_at`·total_steps)
        steps, then falls linearly to `end`·lr at step total_steps; with `peak_at` 0 it
        starts at lr. "linear" decays from lr to 0.
      learning_rate: peak learning rate.
      total_steps: steps in the whole run; needed by every schedule but "constant".
      warmup_steps: linear warm-up length for "warmup_cosine".
      peak_at: "triangular": the fraction of the steps spent rising, in [0, 1).
      end: "triangular": the rate at step total_steps (held after it), as a fraction of the peak.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if not total_steps:
        raise ValueError(f"schedule {name!r} needs total_steps")
    if name == "cosine":
        return optax.cosine_decay_schedule(learning_rate, total_steps)
    if name == "linear":
        return optax.linear_schedule(learning_rate, 0.0, total_steps)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps)
    rise = int(peak_at * total_steps)

    def triangular(step):
        step = jnp.minimum(step, total_steps)
        up = 0.2 + 0.8 * step / max(rise, 1)
        down = 1 + (end - 1) * (step - rise) / (total_steps - rise)
        return learning_rate * jnp.where(step < rise, up, down)

    return triangular


def decay_mask(params):
    """True for weights that take weight decay: kernels, not biases or norm scales.

    Decided by rank and by name, so stacked biases (e.g. (depth, features)) are still excluded.
    """
    def decays(path, p):
        name = str(getattr(path[-1], "key", path[-1])).lower()
        return p.ndim > 1 and "bias" not in name and "scale" not in name
    return jax.tree_util.tree_map_with_path(decays, params)


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")


def make_optimizer(name, learning_rate, *, momentum=0.9, weight_decay=0.0, schedule="constant",
                   total_steps=None, warmup_steps=0):
    """An optax optimizer by name, the PyTorch `torch.optim` names mapped to optax.

    Args:
      name: "sgd", "momentum", "nesterov", "adam" or "adamw".
      learning_rate: a float (shaped by `schedule`) or an optax schedule (then `schedule`,
        `total_steps` and `warmup_steps` are not used).
      momentum: for "momentum" and "nesterov".
      weight_decay: decoupled decay for "adamw"; for "adam" and the SGD family it is added to
        the gradient, as in `torch.optim.Adam` and `torch.optim.SGD`. Biases and norm parameters
        are masked out.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    lr = learning_rate if callable(learning_rate) else make_schedule(
        schedule, learning_rate, total_steps, warmup_steps)
    parts = []
    if name == "adamw":
        parts.append(optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask))
        return optax.chain(*parts)
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    if name == "adam":
        parts.append(optax.adam(lr))
    else:
        parts.append(optax.sgd(lr, momentum=None if name == "sgd" else momentum,
                               nesterov=name == "nesterov"))
    return optax.chain(*parts)
