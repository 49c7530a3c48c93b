"""Max-pooling whose gradient XLA:CPU computes without select-and-scatter.

`max_pool` is a drop-in for `flax.linen.max_pool`. Where the window tiles the input
(window == stride, no padding: the 2x2/2 pool of most CIFAR nets) it runs on CPU as a
max over the window positions of the blocked input, and keeps each window's first
arg-max as int8; the gradient is then one fused select that routes each output
gradient to its arg-max. XLA's select-and-scatter (the gradient of `reduce_window`)
lowers on CPU to iota/scatter/reduce-window loops, which cost the FastNet train step
more than this select does. Other pools, and all non-CPU backends, are `nn.max_pool`.

Ties: the gradient goes to the first maximum of a window in row-major order, which is
the element select-and-scatter picks, so gradients equal `nn.max_pool`'s exactly,
ties included, for finite inputs. (`jnp.max` over the window axes would split a tie
evenly instead.) NaNs propagate to the output as in `nn.max_pool`; a window holding one
routes its gradient to the first maximum before its first NaN (to the NaN where it
comes first): a diverged run's gradient.
"""
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Beyond this many positions per window the unrolled select chain costs more to
# compile than it saves; such pools (rare: global pooling uses jnp.max) stay native.
MAX_WINDOW_SIZE = 64


def _blocked(x, window):
    """(..., *spatial, C) -> (..., o1, w1, o2, w2, ..., C), spatial cropped to whole windows."""
    n = len(window)
    spatial = x.shape[-n - 1:-1]
    x = x[(Ellipsis,) + tuple(slice(0, s // w * w) for s, w in zip(spatial, window)) + (slice(None),)]
    shape = x.shape[:-n - 1] + sum(((s // w, w) for s, w in zip(spatial, window)), ()) + x.shape[-1:]
    return x.reshape(shape)


def _window_axes(ndim_blocked, n):
    """Axes of the window offsets in a blocked array of rank ndim_blocked."""
    first = ndim_blocked - 1 - 2 * n
    return tuple(first + 2 * i + 1 for i in range(n))


def _max_and_argmax(blocked, window):
    """Max over each window and the row-major index of its first maximum (int8)."""
    axes = _window_axes(blocked.ndim, len(window))
    best, argmax = None, None
    for k, offsets in enumerate(itertools.product(*(range(w) for w in window))):
        index = [slice(None)] * blocked.ndim
        for axis, offset in zip(axes, offsets):
            index[axis] = offset
        value = blocked[tuple(index)]
        if best is None:
            best, argmax = value, jnp.zeros(value.shape, jnp.int8)
        else:
            # Strictly greater: on a tie the earlier position keeps the gradient.
            argmax = jnp.where(value > best, jnp.int8(k), argmax)
            best = jnp.maximum(best, value)  # propagates NaN, as reduce_window's max does
    return best, argmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max_pool(blocked, window):
    """Max over the window axes of a blocked array (see `_blocked`)."""
    return _max_and_argmax(blocked, window)[0]


@_tiled_max_pool.defjvp
def _tiled_max_pool_jvp(window, primals, tangents):
    # The tangent is the input tangent at each window's arg-max: a select, linear in
    # the tangent, whose transpose is the one-pass gradient scatter.
    (blocked,), (tangent,) = primals, tangents
    best, argmax = _max_and_argmax(blocked, window)
    axes = _window_axes(blocked.ndim, len(window))
    positions = jnp.arange(math.prod(window), dtype=jnp.int8).reshape(window)
    positions = jnp.expand_dims(positions, tuple(i for i in range(blocked.ndim) if i not in axes))
    chosen = jnp.expand_dims(argmax, axes) == positions
    return best, jnp.sum(jnp.where(chosen, tangent, jnp.zeros((), tangent.dtype)), axis=axes)


def _tiles(inputs, window_shape, strides, padding):
    """True if the windows tile the (cropped) input: stride == window, no padding, and
    sizes known when tracing (with a symbolic height or width from `jax.export`, the
    blocked and the native output sizes are different expressions of one number)."""
    n = len(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * n
    if strides != tuple(window_shape) or inputs.ndim < n + 1:
        return False
    if any(jax.export.is_symbolic_dim(d) for d in inputs.shape[-n - 1:-1]):
        return False
    if not jnp.issubdtype(inputs.dtype, jnp.floating) or math.prod(window_shape) > MAX_WINDOW_SIZE:
        return False
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
    tiled = lambda x: _tiled_max_pool(_blocked(x, window_shape), window_shape)  # noqa: E731
    return lax.platform_dependent(inputs, cpu=tiled, default=native)
