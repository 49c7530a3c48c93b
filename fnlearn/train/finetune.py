"""Fine-tuning: parameter groups chosen by path, frozen groups, and pretrained weights under a new head.

A path is a leaf's module names joined by "/" (`layer1_0/conv1/kernel`). A pattern is a
glob (`fnmatch`) that matches a path or any of its leading parts, so "fc" covers
`fc/kernel` and `fc/bias`, "layer[12]_*" the first two stages, "*" everything.
Rules are `(pattern, group)` pairs; a leaf takes the group of the first rule that matches.
"""
import fnmatch

import flax.linen as nn
import jax
import optax

from fnlearn.checkpoint import leaf_shapes, shape_mismatches

FROZEN = "frozen"


def _path(keys):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def matches(path, pattern):
    """Whether `pattern` matches the "/"-joined `path` or one of its leading parts."""
    parts = path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def group_of(path, rules, default):
    """The group of the first `(pattern, group)` rule matching `path`, or `default`."""
    return next((group for pattern, group in rules if matches(path, pattern)), default)


def param_groups(params, rules, default):
    """A tree like `params` holding each leaf's group name (`optax.multi_transform`'s labels)."""
    return jax.tree_util.tree_map_with_path(lambda keys, _: group_of(_path(keys), rules, default), params)


def partition(transforms, params, rules, default):
    """One optax transform per group, as `optax.multi_transform`; the group `FROZEN` needs none
    (it gets `optax.set_to_zero`, and so no optimizer state), and a group no leaf is in is dropped.

    Args:
      transforms: group name -> optax transform.
      params: the params tree the transform will update.
      rules, default: how each leaf gets its group (see the module docstring).
    """
    labels = param_groups(params, rules, default)
    used = set(jax.tree.leaves(labels))
    transforms = {FROZEN: optax.set_to_zero(), **transforms}
    if missing := used - set(transforms):
        raise ValueError(f"no transform for the parameter groups {sorted(missing)}")
    return optax.multi_transform({g: t for g, t in transforms.items() if g in used}, labels)


def freeze_batch_norm(apply_fn, rules, default):
    """`apply_fn` with the BatchNorm layers whose params are in the `FROZEN` group kept in inference
    mode under `train=True`: they normalise with their running statistics and leave them as they
    are, as a frozen layer should (PyTorch needs `module.eval()` on each for this).

    Done with `nn.intercept_methods`, so the model needs no flag for it. Jit-safe: the choice is
    made while tracing.
    """
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
                and group_of("/".join(module.path), rules, default) == FROZEN):
            kwargs = {**kwargs, "use_running_average": True}
        return next_fun(*args, **kwargs)

    def apply(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return apply


def load_pretrained(variables, pretrained, fresh=()):
    """`variables` (a freshly initialised model's) with every leaf taken from `pretrained` but those
    under the `fresh` patterns, which keep their new init: a new head for a new class count.

    Raises:
      ValueError: a leaf outside `fresh` is missing from `pretrained` or has another shape; the
        message lists each (`params/fc/kernel: saved (512, 10), model (512, 5)`).
    """
    def is_fresh(path):  # the patterns are module paths, under any collection (params, batch_stats)
        return any(matches(path.split("/", 1)[-1], p) for p in fresh)

    def keep(tree):
        return {path: shape for path, shape in leaf_shapes(tree).items() if not is_fresh(path)}

    if lines := shape_mismatches(keep(pretrained), keep(variables), source="pretrained weights"):
        raise ValueError("the pretrained weights do not fit the model:\n  " + "\n  ".join(lines))

    def take(keys, leaf):
        if is_fresh(_path(keys)):
            return leaf
        source = pretrained
        for k in keys:
            source = source[getattr(k, "key", k)]
        return jax.numpy.asarray(source, leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, dict(variables))
