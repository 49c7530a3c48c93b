"""Optimizers and learning-rate schedules by name, as optax chains."""
import jax
import optax

SCHEDULES = ("constant", "cosine", "linear", "triangular", "warmup_cosine")


def make_schedule(name, learning_rate, total_steps=None, warmup_steps=0, peak_at=0.2):
    """A learning-rate schedule by name.

    Args:
      name: one of `SCHEDULES`. "triangular" rises linearly from 0.2·lr to lr at
        `peak_at` of training, then falls linearly to 0 (the fast CIFAR recipe);
        "linear" decays from lr to 0.
      learning_rate: peak learning rate.
      total_steps: steps in the whole run; needed by every schedule but "constant".
      warmup_steps: linear warm-up length for "warmup_cosine".
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
    peak = max(1, int(peak_at * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.2 * learning_rate, learning_rate, peak),
         optax.linear_schedule(learning_rate, 0.0, total_steps - peak)],
        [peak])


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
      learning_rate: a float (shaped by `schedule`) or an optax schedule.
      momentum: for "momentum" and "nesterov".
      weight_decay: decoupled decay for "adamw"; for the SGD family it is added to
        the gradient as in `torch.optim.SGD`. Biases and norm parameters are masked out.
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
