"""What test_ops.py and test_onednn.py share: a conv against lax's on one case, and two checks."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlearn.ops.conv import conv_general_dilated

NHWC = ("NHWC", "HWIO", "NHWC")


def normal(seed, shape):
    """Test data from numpy: jax.random would compile a program per shape."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_pair(x_shape, w_shape, strides, padding, dtype=jnp.float32):
    """(fnlearn's conv, lax's, x, w) for one case; both convs take (x, w)."""
    x = jnp.asarray(normal(0, x_shape), dtype)
    w = jnp.asarray(normal(1, w_shape) / np.sqrt(np.prod(w_shape[:3])), dtype)
    ours = lambda x, w: conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)  # noqa: E731
    ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)  # noqa: E731
    return ours, ref, x, w


def max_relative_error(a, b):
    """The largest difference from `b`, relative to `b`'s largest magnitude."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / np.abs(b).max()


def compiled_text(fn, *args):
    """The HLO XLA compiles `fn` to for `args`."""
    return jax.jit(fn).lower(*args).compile().as_text()
