"""Max-pooling whose gradient XLA:CPU computes without select-and-scatter.

`max_pool` is a drop-in for `flax.linen.max_pool`. Where the window tiles the input
(window == stride, no padding: the 2x2/2 pool of most CIFAR nets) it runs on CPU as a
max over strided slices of the input, one per window position; its derivative finds
each window's first arg-max (int8), and the gradient is then one fused select that
routes each output gradient to its arg-max. XLA's select-and-scatter (the gradient of
`reduce_window`) lowers on CPU to iota/scatter/reduce-window loops, which cost the
FastNet train step more than this select does. Other pools, and all non-CPU backends,
are `nn.max_pool`.

Ties: the gradient goes to the first maximum of a window in row-major order, which is
the element select-and-scatter picks, so gradients equal `nn.max_pool`'s exactly,
ties included, for finite inputs. (`jnp.max` over the window axes would split a tie
evenly instead.) NaNs propagate to the output as in `nn.max_pool`; a window holding one
routes its gradient to its first NaN: a diverged run's gradient.
"""
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fnlearn.ops.conv import explicitly_sharded

# Beyond this many positions per window the unrolled selects cost more to
# compile than it saves; such pools (rare: global pooling uses jnp.max) stay native.
MAX_WINDOW_SIZE = 64


def _window_views(x, window):
    """The strided slices of x, (..., *spatial, C), one per window offset in row-major
    order: the k-th holds each window's k-th element, (..., *out, C). Rows and columns
    past the last whole window are never read, so an odd-sized map needs no cropped copy.

    In float32 (or wider): XLA:CPU computes bfloat16 elementwise work in float32 anyway,
    and converting once before slicing costs less than converting each slice, which it
    writes out where the slice has two uses (the max and the arg-max)."""
    if x.dtype.itemsize < 4:
        x = x.astype(jnp.float32)
    n, lead = len(window), x.ndim - len(window) - 1
    out = [s // w for s, w in zip(x.shape[-n - 1:-1], window)]
    for offsets in itertools.product(*(range(w) for w in window)):
        limit = [d + w * (o - 1) + 1 for d, w, o in zip(offsets, window, out)]
        yield lax.slice(x, (0,) * lead + offsets + (0,), x.shape[:lead] + tuple(limit) + x.shape[-1:],
                        (1,) * lead + window + (1,))


def _first_argmax(views, best):
    """The index (int8) of each window's first view equal to its max `best`, or of its
    first NaN (`best` is then NaN). Compared with the max rather than chained through
    running maxima, so that each slice has one use in this pass."""
    argmax = jnp.full(best.shape, len(views) - 1, jnp.int8)
    for k in reversed(range(len(views) - 1)):
        argmax = jnp.where((views[k] == best) | jnp.isnan(views[k]), jnp.int8(k), argmax)
    return argmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max_pool(x, window):
    """Max over windows that tile x (see `_tiles`); propagates NaN, as reduce_window does."""
    return functools.reduce(jnp.maximum, _window_views(x, window)).astype(x.dtype)


@_tiled_max_pool.defjvp
def _tiled_max_pool_jvp(window, primals, tangents):
    # The tangent is the input tangent at each window's arg-max: a select, linear in the
    # tangent, whose transpose is the one-pass gradient scatter. It selects from the
    # tangent cropped and blocked, (..., o1, w1, o2, w2, ..., C): the transpose is then one
    # fused select-and-pad, where strided slices would transpose to a costlier sum of pads.
    (x,), (tangent,) = primals, tangents
    best = _tiled_max_pool(x, window)  # this rule again under an outer derivative (a Hessian)
    views = list(_window_views(x, window))
    argmax = _first_argmax(views, best.astype(views[0].dtype))
    n = len(window)
    out = [s // w for s, w in zip(tangent.shape[-n - 1:-1], window)]
    cropped = tangent[(Ellipsis,) + tuple(slice(0, o * w) for o, w in zip(out, window)) + (slice(None),)]
    blocked = cropped.reshape(tangent.shape[:-n - 1] + sum(zip(out, window), ()) + tangent.shape[-1:])
    axes = tuple(blocked.ndim - 2 * n + 2 * i for i in range(n))  # the window offsets' axes
    positions = jnp.arange(math.prod(window), dtype=jnp.int8).reshape(window)
    positions = jnp.expand_dims(positions, tuple(i for i in range(blocked.ndim) if i not in axes))
    chosen = jnp.expand_dims(argmax, axes) == positions
    return best, jnp.sum(jnp.where(chosen, blocked, jnp.zeros((), blocked.dtype)), axis=axes)


def _tiles(inputs, window_shape, strides, padding):
    """True if the windows tile the (cropped) input: stride == window, no padding, and
    sizes known when tracing (with a symbolic height or width from `jax.export`, the
    strided and the native output sizes are different expressions of one number)."""
    n = len(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * n
    if strides != tuple(window_shape) or inputs.ndim < n + 1:
        return False
    if any(jax.export.is_symbolic_dim(d) for d in inputs.shape[-n - 1:-1]):
        return False
    if not jnp.issubdtype(inputs.dtype, jnp.floating) or math.prod(window_shape) > MAX_WINDOW_SIZE:
        return False
    if explicitly_sharded(inputs):  # its tiled reshapes would need shardings spelt out
        return False
    if any(s < w for s, w in zip(inputs.shape[-n - 1:-1], window_shape)):
        return False  # an empty output: nothing to gain
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(inputs.shape[-n - 1:-1], window_shape, strides, padding)
    return all(tuple(p) == (0, 0) for p in padding)


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
    """Drop-in for `flax.linen.max_pool` with a cheap gradient on CPU.

    Args:
      inputs: (batch..., *spatial, features) array, as for `nn.max_pool`.
      window_shape: window size per spatial dim.
      strides: stride per spatial dim (default 1).
      padding: "VALID", "SAME" or per-dim (low, high) pairs.
    Returns:
      the pooled array, equal to `nn.max_pool(inputs, window_shape, strides, padding)`.
    """
    window_shape = tuple(window_shape)
    native = functools.partial(nn.max_pool, window_shape=window_shape, strides=strides, padding=padding)
    if not _tiles(inputs, window_shape, strides, padding):
        return native(inputs)
    tiled = lambda x: _tiled_max_pool(x, window_shape)  # noqa: E731
    return lax.platform_dependent(inputs, cpu=tiled, default=native)
