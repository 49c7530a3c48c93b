"""Looking at gradients: `register_hook`'s analogue, and per-layer statistics computed under jit.

`grad_stats(grads)` gives each parameter's gradient norm, mean and largest magnitude as
arrays, so a jitted step returns them beside its loss and the host reads them only when it
logs. `hook_gradients(apply_fn, patterns, fn)` calls `fn(name, gradient)` with the gradient
of each matching submodule's output during the backward pass: the output goes through an
identity whose VJP hands its cotangent to `jax.debug.callback`, so it works under `jit`.
"""
import fnmatch
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fnlearn.pytrees import path_name


def grad_stats(grads):
    """`{"layer1_0/conv1/kernel": {"norm", "mean", "max_abs"}}` of a gradient pytree, as float32 scalars.

    Call it inside the jitted step (it is three reductions a leaf) and read it back at log steps.
    """
    def stats(g):
        g = g.astype(jnp.float32)
        return {"norm": jnp.sqrt(jnp.sum(g * g)), "mean": jnp.mean(g), "max_abs": jnp.max(jnp.abs(g))}

    return {path_name(keys): stats(g) for keys, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def grad_hook(x, fn, name):
    """`x` unchanged; in the backward pass `fn(name, dx)` is called with x's cotangent (a NumPy array)."""
    return x


def _hook_forward(x, fn, name):
    return x, None


def _hook_backward(fn, name, _, cotangent):
    jax.debug.callback(functools.partial(fn, name), cotangent)
    return (cotangent,)


grad_hook.defvjp(_hook_forward, _hook_backward)


def hook_gradients(apply_fn, patterns, fn):
    """`apply_fn` with `grad_hook` on the output of every submodule whose path matches one of `patterns`.

    Args:
      apply_fn: a Flax `model.apply`.
      patterns: globs over "/"-joined module paths ("layer1_0/conv1", "layer4_*", "fc").
      fn: `fn(path, gradient)`, called on the host during each backward pass (under `jit`, in no set order).
    Returns:
      the wrapped apply; differentiate through it as through `apply_fn`.
    """
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path and any(fnmatch.fnmatchcase(path, p) for p in patterns):
            out = jax.tree.map(lambda y: grad_hook(y, fn, path) if jnp.issubdtype(y.dtype, jnp.inexact) else y, out)
        return out

    def apply(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return apply
