"""Layers and initialisers the zoo builds on, so every model family shares one copy.

The conv and pool here are the ones every model uses, so a faster lowering (chosen by
backend in `fnlearn.ops`) reaches the whole zoo.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fnlearn.ops import batch_norm
from fnlearn.ops.conv import conv_general_dilated
from fnlearn.ops.pool import max_pool

# PyTorch's default weight init for Linear and Conv, kaiming_uniform_(a=sqrt(5)), is
# U(±1/sqrt(fan_in)); this reads fan_in from the kernel's shape (receptive field * C_in).
# Same distribution as `torch_uniform_init`, other numbers for the same key.
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_uniform_init(fan_in):
    """U(±1/sqrt(fan_in)): PyTorch's default for Linear, Conv and RNN weights and biases.

    For params whose shape does not give the fan-in (biases, (out, in) weights, stacked
    layers); `torch_kernel_init` draws the same distribution from a kernel's shape.

    Args:
      fan_in: number of inputs of the layer (in_features, or kh * kw * C_in).
    Returns:
      an initializer `(key, shape, dtype=float32) -> array`.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Conv):
    """`nn.Conv` whose convolution is `fnlearn.ops.conv_general_dilated`.

    Same attributes, parameters and results as `nn.Conv`; on CPU, unpadded 1x1 convs
    run as dots and other plain 2-D convs in oneDNN (or, without it, with gradients spelt
    in XLA:CPU's fast layouts; see `fnlearn.ops.conv`); every other backend gets lax's
    convolution.
    """
    conv_general_dilated: Any = conv_general_dilated


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` that trains on bfloat16 in oneDNN on CPU and runs under strict dtype promotion.

    Same attributes, variables and results as `nn.BatchNorm`. In training, on CPU, a
    plain one (channels last, no `axis_name` or mask, `dtype` bfloat16) on bfloat16
    activations runs in oneDNN where it has kernels for them (`fnlearn.ops.batch_norm`):
    XLA:CPU's own takes far longer than PyTorch's there. Its variance is the two-pass one,
    not flax's fast E[x^2] - E[x]^2; other platforms and other cases are flax's.

    With a bfloat16 input, flax's BatchNorm computes its statistics in float32 and mixes
    them with the input by implicit promotion, which `jax.numpy_dtype_promotion("strict")`
    rejects. That promotion is intended (statistics in float32, as airbench keeps its
    BatchNorms in float32), so it is allowed here and only here.
    """

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None):
        """Normalises x, (..., C), over all axes but the last; returns (..., C) in `dtype`."""
        with jax.numpy_dtype_promotion("standard"):
            training = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
            plain = (mask is None and self.axis_name is None and self.force_float32_reductions
                     and self.axis in (-1, (-1,), x.ndim - 1, (x.ndim - 1,)) and self.dtype is not None
                     and jnp.dtype(self.param_dtype) in (jnp.float32, jnp.bfloat16))
            if not (training and plain and batch_norm.takes(x, jnp.dtype(self.dtype))):
                # flax's body, not its wrapped method: a second module call of the same module would
                # reach method interceptors twice (gradient hooks fired twice, graphs drew bn1/bn1).
                return nn.BatchNorm.__call__.__wrapped__(self, x, use_running_average=use_running_average, mask=mask)
            # oneDNN's, with the variables flax's BatchNorm makes, in its order.
            channels = (x.shape[-1],)
            ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), channels)
            ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), channels)
            scale = self.param("scale", self.scale_init, channels, self.param_dtype) if self.use_scale else None
            bias = self.param("bias", self.bias_init, channels, self.param_dtype) if self.use_bias else None
            y, mean, var = batch_norm.train_batch_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype),
                                                       self.use_fast_variance)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
            return y


def remat_block(block_cls):
    """`block_cls` under `nn.remat` (activation checkpointing): its activations are recomputed
    in the backward pass instead of kept from the forward one.

    The policy saves nothing inside a block, only its input: the least memory, for one
    more forward pass of every block (PyTorch's `checkpoint_sequential` makes the same
    trade). `train`, the block's second argument (argnum 2, `self` being 0), is static.
    Parameter paths are unchanged, so checkpoints load either way.
    """
    return nn.remat(block_cls, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable)


__all__ = ["BatchNorm", "Conv", "max_pool", "remat_block", "torch_kernel_init", "torch_uniform_init"]
