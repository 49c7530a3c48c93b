"""Fine-tuning: parameter groups chosen by path, frozen groups, and pretrained weights under a new head.

A path is a leaf's module names joined by "/" (`layer1_0/conv1/kernel`). A pattern is a
glob (`fnmatch`) that matches a path or any of its leading parts, so "fc" covers
`fc/kernel` and `fc/bias`, "layer[12]_*" the first two stages, "*" everything.
Rules are `(pattern, group)` pairs; a leaf takes the group of the first rule that matches.
"""
import fnmatch

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fnlearn.pytrees import leaf_paths, leaf_shapes, path_name, shape_mismatches

FROZEN = "frozen"


def matches(path, pattern):
    """Whether `pattern` matches the "/"-joined `path` or one of its leading parts."""
    parts = path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def group_of(path, rules, default):
    """The group of the first `(pattern, group)` rule matching `path`, or `default`."""
    return next((group for pattern, group in rules if matches(path, pattern)), default)


def param_groups(params, rules, default):
    """A tree like `params` holding each leaf's group name (`optax.multi_transform`'s labels)."""
    return jax.tree_util.tree_map_with_path(lambda keys, _: group_of(path_name(keys), rules, default), params)


def partition(transforms, params, rules, default):
    """One optax transform per group, as `optax.multi_transform`; the group `FROZEN` needs none
    (it gets `optax.set_to_zero`, and so no optimizer state).

    Args:
      transforms: group name -> optax transform.
      params: the params tree the transform will update.
      rules, default: how each leaf gets its group (see the module docstring).
    Raises:
      ValueError: a group has no transform, or a transform no leaf (a pattern that matches nothing).
    """
    used = set(jax.tree.leaves(param_groups(params, rules, default)))
    if missing := used - set(transforms) - {FROZEN}:
        raise ValueError(f"no transform for the parameter groups {sorted(missing)}")
    if unused := set(transforms) - used:
        raise ValueError(f"no parameter is in the groups {sorted(unused)}: check the patterns {rules}")
    groups = {FROZEN: optax.set_to_zero(), **transforms}
    return optax.multi_transform({g: t for g, t in groups.items() if g in used},
                                 param_groups(params, rules, default))


def frozen_modules(params, rules, default):
    """Paths of the modules (`layer1_0/bn1`) whose params are all in the `FROZEN` group."""
    groups = {}
    for path, group in zip(leaf_paths(params), jax.tree.leaves(param_groups(params, rules, default))):
        module = path.rpartition("/")[0]
        groups.setdefault(module, set()).add(group)
    return {module for module, found in groups.items() if found == {FROZEN}}


def freeze(apply_fn, params, rules, default):
    """`apply_fn` with the params in the `FROZEN` group frozen the way PyTorch's
    `requires_grad=False` and `module.eval()` freeze them:

    - their gradients are exact zeros (`lax.stop_gradient`), so JAX builds no backward pass
      into them, and the global norm a step clips by or reports (`make_train_step`) is the
      trained params' alone, as `clip_grad_norm_` sees only params with a `.grad`;
    - the BatchNorm layers whose params are all frozen run in inference mode under
      `train=True`: they normalise with their running statistics and leave them as they are.

    Done with `nn.intercept_methods`, so the model needs no flag of its own, but its BatchNorm must
    take `use_running_average` at call time (the zoo's do). Jit-safe: the choice is made while tracing.
    """
    groups = param_groups(params, rules, default)
    frozen = frozen_modules(params, rules, default)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
                and "/".join(module.path) in frozen):
            kwargs = {**kwargs, "use_running_average": True}
        return next_fun(*args, **kwargs)

    def apply(variables, *args, **kwargs):
        stopped = jax.tree.map(lambda p, group: jax.lax.stop_gradient(p) if group == FROZEN else p,
                               variables["params"], groups)
        with nn.intercept_methods(interceptor):
            return apply_fn({**variables, "params": stopped}, *args, **kwargs)

    return apply


def load_pretrained(variables, pretrained, fresh=()):
    """`variables` (a freshly initialised model's) with every leaf taken from `pretrained` but those
    under the `fresh` patterns, which keep their new init: a new head for a new class count.

    Raises:
      ValueError: a `fresh` pattern matches no leaf, or a leaf outside `fresh` is missing from
        `pretrained` or has another shape; the message lists each
        (`params/fc/kernel: saved (512, 10), model (512, 5)`).
    """
    def is_fresh(path, patterns=fresh):  # module paths, under any collection (params, batch_stats)
        return any(matches(path.split("/", 1)[-1], p) for p in patterns)

    paths = leaf_paths(variables)
    if unmatched := [p for p in fresh if not any(is_fresh(path, (p,)) for path in paths)]:
        raise ValueError(f"the head pattern {unmatched[0]!r} matches no parameter of the model")
    kept = {path: shape for path, shape in leaf_shapes(variables).items() if not is_fresh(path)}
    offered = {path: shape for path, shape in leaf_shapes(pretrained).items() if not is_fresh(path)}
    if lines := shape_mismatches(offered, kept, source="pretrained weights"):
        raise ValueError("the pretrained weights do not fit the model:\n  " + "\n  ".join(lines))
    flat = dict(zip(leaf_paths(pretrained), jax.tree.leaves(pretrained)))
    # Copies (jnp.array, not asarray): a train step donates its state, which must not take `pretrained` with it.
    return jax.tree_util.tree_map_with_path(
        lambda keys, leaf: leaf if is_fresh(path_name(keys)) else jnp.array(flat[path_name(keys)], leaf.dtype),
        dict(variables))
