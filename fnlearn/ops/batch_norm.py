"""Training-mode batch normalisation that XLA:CPU runs in oneDNN, through XLA's FFI.

flax's BatchNorm computes its statistics and normalises in float32 with XLA's ops; with
bfloat16 activations XLA:CPU first writes a float32 copy of each input in full, and the
layer takes far longer than PyTorch's (docs/performance.md). oneDNN's batch
normalisation, in the library `fnlearn.ops.onednn` loads, reads bf16 in place and
computes in float32.

`batch_norm(x, scale, shift, epsilon)` is three primitives over a (M, C) view of x:

- forward: (x, scale, shift) -> (y, mean, variance), oneDNN on CPU;
- tangent: the forward's derivative, linear in (dx, dscale, dshift), lax everywhere;
- backward: the tangent's transpose, (dy, x, mean, variance, scale) -> (dx, dscale,
  dshift), oneDNN on CPU.

So `jax.grad` runs both oneDNN directions and `jax.jvp` the tangent; derivatives of the
tangent and the backward differentiate their lax references, as does `vmap` (each mapped
slice has its own statistics). Other platforms, `jax.export`, programs split over several
devices and operands oneDNN has no jitted kernel for lower the lax references. The
variance is the biased two-pass one oneDNN computes; flax's default is E[x^2] - E[x]^2.

`train_batch_norm` is what `fnlearn.models.layers.BatchNorm` calls in training on bf16
activations: these primitives on CPU, flax's own formula elsewhere.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching

from fnlearn.ops import onednn


def _normalized(x, mean, variance, epsilon):
    """((x - mean) / std in float32, 1 / std)."""
    inv_std = lax.rsqrt(variance + epsilon)
    return (x.astype(jnp.float32) - mean) * inv_std, inv_std


def _forward_ref(x, scale, shift, *, epsilon):
    xf = x.astype(jnp.float32)
    mean = xf.mean(0)
    variance = jnp.square(xf - mean).mean(0)
    x_hat, _ = _normalized(x, mean, variance, epsilon)
    return [(x_hat * scale + shift).astype(x.dtype), mean, variance]


def _tangent_ref(dx, dscale, dshift, x, mean, variance, scale, *, epsilon):
    # d mean = mean(dx) and d variance = 2 mean((x - mean) dx) make the x term a projection.
    x_hat, inv_std = _normalized(x, mean, variance, epsilon)
    dxf = dx.astype(jnp.float32)
    projected = dxf - dxf.mean(0) - x_hat * (dxf * x_hat).mean(0)
    return (scale * inv_std * projected + dscale * x_hat + dshift).astype(x.dtype)


def _backward_ref(dy, x, mean, variance, scale, *, epsilon):
    # The tangent's transpose: its projection is symmetric.
    x_hat, inv_std = _normalized(x, mean, variance, epsilon)
    dyf = dy.astype(jnp.float32)
    dscale, dshift = (dyf * x_hat).sum(0), dyf.sum(0)
    dx = scale * inv_std * (dyf - (dshift + x_hat * dscale) / x.shape[0])
    return [dx.astype(x.dtype), dscale, dshift]


def _check(x, *channels):
    """Raises TypeError unless x is (M, C) float32 or bfloat16 and each of `channels` (C,) float32."""
    if (x.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16)
            or any(c.shape != x.shape[1:] or c.dtype != jnp.float32 for c in channels)):
        raise TypeError("oneDNN batch norm: (M, C) float32 or bfloat16 activations and (C,) float32 "
                        f"statistics, got {' '.join(a.str_short() for a in (x,) + channels)}")


def _forward_shape(x, scale, shift, **_):
    _check(x, scale, shift)
    stat = jax.core.ShapedArray(x.shape[1:], jnp.float32)
    return [jax.core.ShapedArray(x.shape, x.dtype), stat, stat]


def _tangent_shape(dx, dscale, dshift, x, mean, variance, scale, **_):
    _check(x, dscale, dshift, mean, variance, scale)
    if dx.shape != x.shape or dx.dtype != x.dtype:
        raise TypeError(f"oneDNN batch norm: a tangent {dx.str_short()} for activations {x.str_short()}")
    return jax.core.ShapedArray(x.shape, x.dtype)


def _backward_shape(dy, x, mean, variance, scale, **_):
    _check(x, mean, variance, scale)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise TypeError(f"oneDNN batch norm: a gradient {dy.str_short()} for activations {x.str_short()}")
    return _forward_shape(x, scale, scale)


def _epsilon(epsilon):
    return {"epsilon": np.float32(epsilon)}


def _ffi_takes(x, *_):
    """Whether oneDNN's jitted kernels take (M, C) activations x: float32, or bfloat16 where this
    CPU has them; M > 0, and C a multiple of 16 (other counts run in oneDNN's generic loops,
    slower than XLA)."""
    bf16 = x.dtype == jnp.bfloat16 and onednn.native_bfloat16("batch_norm")
    return (x.dtype == jnp.float32 or bf16) and x.shape[0] > 0 and x.shape[1] > 0 and x.shape[1] % 16 == 0


forward_p = onednn.primitive("batch_norm_forward", _forward_ref, _forward_shape, "fnlearn_batch_norm_forward",
                             _epsilon, multiple_results=True, takes=_ffi_takes)
tangent_p = onednn.primitive("batch_norm_tangent", _tangent_ref, _tangent_shape)
backward_p = onednn.primitive("batch_norm_backward", _backward_ref, _backward_shape, "fnlearn_batch_norm_backward",
                              _epsilon, multiple_results=True, takes=lambda dy, x, *_: _ffi_takes(x))


def _forward_jvp(primals, tangents, *, epsilon):
    x, scale, shift = primals
    y, mean, variance = forward_p.bind(x, scale, shift, epsilon=epsilon)
    dx, dscale, dshift = map(ad.instantiate_zeros, tangents)
    dy = tangent_p.bind(dx, dscale, dshift, x, mean, variance, scale, epsilon=epsilon)
    dxf = dx.astype(jnp.float32)
    dmean = dxf.mean(0)
    dvariance = 2 * ((x.astype(jnp.float32) - mean) * dxf).mean(0)
    return [y, mean, variance], [dy, dmean, dvariance]


def _tangent_transpose(ct, dx, dscale, dshift, x, mean, variance, scale, *, epsilon):
    assert not any(map(ad.is_undefined_primal, (x, mean, variance, scale)))
    linear = (dx, dscale, dshift)
    if type(ct) is ad.Zero:
        grads = [None] * 3
    else:
        grads = backward_p.bind(ct, x, mean, variance, scale, epsilon=epsilon)
    return [g if ad.is_undefined_primal(t) else None for g, t in zip(grads, linear)] + [None] * 4


def _jvp_of_reference(reference):
    """A JVP rule that differentiates `reference` (lax)."""
    def rule(primals, tangents, **params):
        return jax.jvp(functools.partial(reference, **params), primals, tuple(map(ad.instantiate_zeros, tangents)))
    return rule


def _vmap_of_reference(reference):
    """A batching rule that maps `reference`: each mapped slice keeps its own statistics."""
    def rule(args, dims, **params):
        out = jax.vmap(functools.partial(reference, **params), in_axes=dims)(*args)
        return out, jax.tree.map(lambda _: 0, out)
    return rule


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_jvps[tangent_p] = _jvp_of_reference(_tangent_ref)
ad.primitive_jvps[backward_p] = _jvp_of_reference(_backward_ref)
for _primitive, _reference in ((forward_p, _forward_ref), (tangent_p, _tangent_ref), (backward_p, _backward_ref)):
    batching.primitive_batchers[_primitive] = _vmap_of_reference(_reference)


def batch_norm(x, scale, shift, epsilon):
    """Training-mode batch normalisation over every axis of x but the last, in oneDNN on CPU.

    Where oneDNN's jitted kernels do not take x (see `_ffi_takes`), the lax reference runs.

    Args:
      x: (..., C) float32 or bfloat16 activations.
      scale, shift: (C,) float32.
      epsilon: added to the variance.
    Returns:
      (y, mean, variance): y (..., C) in x's dtype; the batch's mean and biased
      variance, (C,) float32.
    """
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    y, mean, variance = forward_p.bind(rows, scale, shift, epsilon=float(epsilon))
    return y.reshape(x.shape), mean, variance


def _flax_formula(x, scale, shift, epsilon, dtype, fast_variance):
    """flax's `BatchNorm` in training (`_compute_stats` then `_normalize`), for other platforms."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes)
    if fast_variance:
        variance = jnp.maximum(0.0, jnp.square(xf).mean(axes) - jnp.square(mean))
    else:
        variance = jnp.square(xf - mean).mean(axes)
    mul = lax.rsqrt(variance + epsilon)
    if scale is not None:
        mul = mul * scale
    y = (xf - mean) * mul
    if shift is not None:
        y = y + shift
    return y.astype(dtype), mean, variance


def takes(x, dtype):
    """Whether `train_batch_norm` runs on x in oneDNN on CPU: bfloat16 in and out (`dtype`), at least
    2 axes of known sizes, and oneDNN's jitted kernels take it (`_ffi_takes`).

    Not float32: there oneDNN's batch norm is no faster than XLA's, which fuses the ops around it
    (docs/performance.md).
    """
    if x.dtype != jnp.bfloat16 or dtype != jnp.bfloat16 or x.ndim < 2:
        return False
    if any(jax.export.is_symbolic_dim(d) for d in x.shape):
        return False
    return _ffi_takes(jax.core.ShapedArray((math.prod(x.shape[:-1]), x.shape[-1]), x.dtype))


def train_batch_norm(x, scale, shift, epsilon, dtype, fast_variance=True):
    """A training-mode BatchNorm over every axis of x but the last: oneDNN on CPU, flax's formula elsewhere.

    Args:
      x: (..., C) activations, for which `takes(x, dtype)`.
      scale, shift: (C,) float32 or bfloat16, or None (none).
      epsilon: added to the variance.
      dtype: of the result.
      fast_variance: flax's `use_fast_variance`, off the CPU.
    Returns:
      (y (..., C) in dtype, the batch's mean, its biased variance), statistics in float32.
    """
    channels = x.shape[-1]

    def cpu(x, scale, shift):
        scale = jnp.ones(channels, jnp.float32) if scale is None else scale.astype(jnp.float32)
        shift = jnp.zeros(channels, jnp.float32) if shift is None else shift.astype(jnp.float32)
        return batch_norm(x, scale, shift, epsilon)

    def default(x, scale, shift):
        return _flax_formula(x, scale, shift, epsilon, dtype, fast_variance)

    return lax.platform_dependent(x, scale, shift, cpu=cpu, default=default)
