"""Convolution lowered the way a CPU runs it fastest; other backends keep lax's native conv.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (Flax passes it as
`nn.Conv(conv_general_dilated=...)`). The choice is made per backend at lowering time
with `lax.platform_dependent`, so user code never changes and GPU/TPU programs are
exactly what lax would build.

What runs on CPU, per case (the figures are in docs/performance.md):

- k x k convolutions (k > 1, or padded), 2-D: oneDNN, through an XLA FFI call
  (`fnlearn.ops.onednn`), where the library is built and loaded. It is the library
  PyTorch's CPU convolutions run in, faster than XLA's Eigen convolutions in the forward
  and input-gradient directions, and it has real bf16 kernels on CPUs with AVX512-BF16.
- The same without oneDNN (not built, `FNLEARN_ONEDNN=0`, 1-D or 3-D): lax's own
  convolution in all three directions, with the
  kernel- and input-gradient convolutions spelt in the operand layouts XLA:CPU's Eigen
  convolution takes (input (C, H, W, N) and output gradient (H, W, N, C) for the kernel
  gradient; the kernel stored (kh, kw, O, I) for the input gradient). A `custom_jvp`
  writes the tangent in those layouts, so JAX's transposes of it are those convolutions.
  At a program's top level XLA builds this anyway (it inserts the same transposes),
  but XLA:CPU puts convolutions in Eigen's layouts only there: inside a `lax.scan`,
  `fori_loop` or `cond` a gradient convolution left as it is runs as a plain loop
  nest, many times slower. With this spelling the compiled run (`fit(..., compiled=True)`) of a conv net
  runs its convolutions at full speed, and forward mode (`jax.jvp`, Hessian-vector
  products) keeps working: the `custom_jvp` is plain lax.
  Eigen's convolution (with YNNPACK's turned off in `fnlearn.ops.flags`) beat every
  dot-based rewrite measured, in every direction: im2col + one dot, per-tap 1x1 dots,
  dot-then-shift-add, a one-conv kernel grad over a tall image. Winograd F(2x2,3x3) and
  F(4x4,3x3) forward were mostly slower too: their dots are fast, but XLA:CPU writes
  the transformed input slowly, as it does im2col's patch matrix. bfloat16 operands
  gain nothing: this XLA build has no AVX512-BF16 dot kernel, and XLA already runs a
  bf16 convolution in float32.
- 1 x 1 convolutions (ResNet shortcuts and bottlenecks): one 2-D dot on the strided
  input. Its kernel grad is then a dot contracting the leading axis of both operands,
  which Eigen reads transposed in place, where the native kernel grad first copies
  both operands into transposed layouts; forward and input grad are no slower. Plain
  `jnp.dot` is used, not a `custom_vjp`: the transposes autodiff derives are already
  these best lowerings, and forward-mode AD (`jax.jvp`, `jacfwd`) keeps working.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from fnlearn.ops import onednn


def _channels_last_numbers(num_spatial):
    """ConvDimensionNumbers of NHWC / HWIO / NHWC (any number of spatial dims)."""
    n = num_spatial
    lhs = (0, n + 1) + tuple(range(1, n + 1))  # batch, feature, spatial...
    rhs = (n + 1, n) + tuple(range(n))         # out feature, in feature, spatial...
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def explicitly_sharded(*arrays):
    """Whether an operand's type carries a sharding (a mesh of explicit axes, `jax.make_mesh`'s default).

    fnlearn's own lowerings leave such operands to lax: JAX propagates explicit shardings
    through its own ops, and through the permuted layouts spelt here it put the batch's
    sharding on the channel axis (an error in the gradient).
    """
    return any(axis is not None for a in arrays for axis in jax.typeof(a).sharding.spec)


def _channels_last_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count):
    """(strides, explicit padding) if this is a plain channels-last conv fnlearn lowers itself, else None.

    Plain: NHWC / HWIO / NHWC, one floating dtype, no dilation, no groups, no explicit
    sharding in the operands' types, and image and window sizes known when tracing (a
    symbolic height or width from `jax.export` makes symbolic padding, which lax's
    convolution takes and these lowerings do not).
    """
    num_spatial = lhs.ndim - 2
    if num_spatial < 1 or rhs.ndim != lhs.ndim or lhs.dtype != rhs.dtype:
        return None
    if any(jax.export.is_symbolic_dim(d) for d in lhs.shape[1:-1] + rhs.shape[:num_spatial]):
        return None
    if not jnp.issubdtype(lhs.dtype, jnp.floating) or explicitly_sharded(lhs, rhs):
        return None
    if feature_group_count != 1 or batch_group_count != 1:
        return None
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
        return None
    if dimension_numbers is None:  # lax's default is NCHW / OIHW
        return None
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if numbers != _channels_last_numbers(num_spatial):
        return None
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:num_spatial], strides, padding)
    return strides, tuple((int(lo), int(hi)) for lo, hi in padding)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def spatial_conv(x, kernel, strides, padding, precision=None, preferred_element_type=None):
    """A channels-last convolution whose gradients XLA:CPU runs as Eigen convolutions anywhere.

    Args:
      x: (B, *spatial, C_in) input.
      kernel: (*window, C_in, C_out) kernel.
      strides: one stride per spatial dim.
      padding: one (low, high) pair per spatial dim.
      precision, preferred_element_type: as for `lax.conv_general_dilated`.
    Returns:
      what `lax.conv_general_dilated` returns for NHWC / HWIO / NHWC.
    """
    numbers = _channels_last_numbers(x.ndim - 2)
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=numbers,
                                    precision=precision, preferred_element_type=preferred_element_type)


def _conv_spelt(x, kernel, x_order, kernel_order, out_order, strides, padding, precision, out_type):
    """`spatial_conv(x, kernel)`, computed by a convolution on other axis orders.

    The convolution takes `x.transpose(x_order)` and `kernel.transpose(kernel_order)`
    and makes the result transposed by `out_order`, which is then transposed back.
    The value is the same; what changes is the layouts of the convolutions JAX derives
    when it transposes this one for a gradient.
    """
    n = x.ndim - 2
    canonical = _channels_last_numbers(n)

    def spec(order, logical):  # where each logical axis of `logical` lies after `order`
        return tuple(order.index(axis) for axis in logical)

    numbers = lax.ConvDimensionNumbers(spec(x_order, canonical.lhs_spec), spec(kernel_order, canonical.rhs_spec),
                                       spec(out_order, canonical.out_spec))
    y = lax.conv_general_dilated(x.transpose(x_order), kernel.transpose(kernel_order), strides, padding,
                                 dimension_numbers=numbers, precision=precision, preferred_element_type=out_type)
    return y.transpose(tuple(out_order.index(axis) for axis in range(n + 2)))


def _spatial_conv_jvp(strides, padding, precision, preferred_element_type, primals, tangents):
    # The tangent is linear in (dx, dkernel); JAX transposes each term into a gradient
    # convolution whose operands are in the layouts spelt here, which are Eigen's:
    #   input grad:  output grad (B, S.., O) with the kernel as (K.., O, I);
    #   kernel grad: input as (C, S.., B) with the output grad as (S.., B, O), into (I, K.., O).
    x, kernel = primals
    dx, dkernel = tangents
    n = x.ndim - 2
    spatial = tuple(range(1, n + 1))
    identity = tuple(range(n + 2))
    args = strides, padding, precision, preferred_element_type
    y = spatial_conv(x, kernel, *args)
    terms = []
    if not isinstance(dx, SymbolicZero):
        kernel_oi = tuple(range(n)) + (n + 1, n)
        terms.append(_conv_spelt(dx, kernel, identity, kernel_oi, identity, *args))
    if not isinstance(dkernel, SymbolicZero):
        x_cb = (n + 1,) + spatial + (0,)
        kernel_io = (n,) + tuple(range(n)) + (n + 1,)
        out_sb = spatial + (0, n + 1)
        terms.append(_conv_spelt(x, dkernel, x_cb, kernel_io, out_sb, *args))
    dy = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)
    return y, dy


spatial_conv.defjvp(_spatial_conv_jvp, symbolic_zeros=True)


def pointwise_conv(x, kernel, strides, precision=None, preferred_element_type=None):
    """A channels-last 1x1 convolution as one 2-D dot.

    Args:
      x: (B, *spatial, C_in) input.
      kernel: (1, ..., 1, C_in, C_out) kernel.
      strides: one stride per spatial dim.
      precision, preferred_element_type: as for `lax.conv_general_dilated`.
    Returns:
      (B, *ceil(spatial / strides), C_out), in `preferred_element_type` or x's dtype.
    """
    x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]  # the sampled pixels
    c_in, c_out = kernel.shape[-2:]
    out_dtype = preferred_element_type or x.dtype
    # Half-precision operands accumulate in float32, as the native convolution does.
    # (Chosen explicitly: promote_types fails under strict dtype promotion.)
    accumulate = jnp.float32 if jnp.finfo(out_dtype).bits < 32 else out_dtype
    y = jnp.dot(x.reshape(math.prod(x.shape[:-1]), c_in), kernel.reshape(c_in, c_out), precision=precision,
                preferred_element_type=accumulate)
    return y.astype(out_dtype).reshape(x.shape[:-1] + (c_out,))


def _onednn_takes(x, kernel, pads):
    """Whether oneDNN runs this plain channels-last conv: 2-D, padding >= 0, a non-empty
    result (lax makes empty ones where oneDNN refuses), and at most float32 precision."""
    # Each size compared on its own: a symbolic batch (`jax.export`) is known only to be >= 1.
    return (onednn.enabled() and x.ndim == 4 and x.dtype != jnp.float64
            and all(size > 0 for size in (x.shape[0], x.shape[3], kernel.shape[3]))
            and all(lo >= 0 and hi >= 0 and x.shape[1 + i] + lo + hi >= kernel.shape[i]
                    for i, (lo, hi) in enumerate(pads)))


def onednn_conv(x, kernel, strides, padding, preferred_element_type=None):
    """A channels-last 2-D convolution in oneDNN (`fnlearn.ops.onednn`), for XLA:CPU.

    bfloat16 runs as bfloat16 where oneDNN has kernels for it on this CPU, and in
    float32 elsewhere, as XLA's own convolution does; other floats run in float32.
    """
    out_dtype = preferred_element_type or x.dtype
    native = x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and out_dtype == x.dtype
                                        and onednn.native_bfloat16())
    compute = x.dtype if native else jnp.float32
    y = onednn.conv(x.astype(compute), kernel.astype(compute), strides, padding)
    return y.astype(out_dtype)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated` that takes the fastest lowering on CPU.

    Same arguments and result as `lax.conv_general_dilated`. On CPU, plain channels-last
    convs (no dilation or groups) become a dot when 1x1 and unpadded; other 2-D ones run
    in oneDNN where `onednn.enabled()`, and as `spatial_conv` otherwise. Everything else,
    and every non-CPU backend, is lax's native convolution.
    """
    native = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    plain = _channels_last_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count)
    if plain is None:
        return native(lhs, rhs)
    strides, pads = plain
    num_spatial = lhs.ndim - 2
    if rhs.shape[:num_spatial] == (1,) * num_spatial and all(p == (0, 0) for p in pads):
        cpu = functools.partial(pointwise_conv, strides=strides, precision=precision,
                                preferred_element_type=preferred_element_type)
    elif _onednn_takes(lhs, rhs, pads):
        cpu = functools.partial(onednn_conv, strides=strides, padding=pads,
                                preferred_element_type=preferred_element_type)
    else:  # a padded 1x1 conv adds a border of zeros, so it is a spatial conv too
        cpu = lambda x, kernel: spatial_conv(x, kernel, strides, pads, precision,  # noqa: E731
                                             preferred_element_type)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=native)
