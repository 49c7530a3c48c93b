"""Leaves named by path, as checkpoints, error messages and fine-tuning rules name them.

A path is the keys from the root joined by "/": `params/layer1_0/conv1/kernel`.
"""
import jax


def path_name(keys):
    """The "/"-joined name of a `tree_flatten_with_path` key path (dict keys, attributes, indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def leaf_paths(tree):
    """The path name of each leaf of `tree`, in flatten order."""
    return [path_name(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def leaf_shapes(tree):
    """`{"params/fc/kernel": shape}` for each leaf of `tree`: arrays, ShapeDtypeStructs or orbax's
    array metadata (empty nodes, such as a frozen leaf's optimizer state, have no leaves)."""
    return {path_name(keys): tuple(leaf.shape) for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatches(saved, wanted, source="checkpoint"):
    """What keeps `saved` from loading as `wanted` (both `leaf_shapes` dicts), as lines: each leaf whose
    shape differs (`params/fc/kernel: saved (256, 10), model (256, 5)`), then the missing and extra ones."""
    lines = [f"{path}: saved {saved[path]}, model {shape}"
             for path, shape in wanted.items() if path in saved and saved[path] != shape]
    if missing := [path for path in wanted if path not in saved]:
        lines.append(f"missing from the {source}: {', '.join(missing)}")
    if extra := [path for path in saved if path not in wanted]:
        lines.append(f"not in the model: {', '.join(extra)}")
    return lines
