"""The PyTorch tutorials' small models, with PyTorch's shapes and default init.

Every model is a Flax Linen module used through `apply(variables, x)`. Inputs are
NHWC for images (PyTorch uses NCHW); dense layers store kernels as (in, out).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from fnlearn.models.layers import Conv
from fnlearn.models.layers import torch_uniform_init


class Linear(nn.Module):
    """`torch.nn.Linear` with PyTorch's init; kernel stored (in, out)."""
    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        init = torch_uniform_init(fan_in)  # kernel and bias alike, as torch.nn.Linear
        kernel = self.param("kernel", init, (fan_in, self.features), self.param_dtype)
        # As flax's Dense: without a dtype, the input's and the params' promoted (an integer input
        # would otherwise truncate the kernel to zeros).
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


class CustomLinear(nn.Module):
    """Explicit weight (out, in) and bias (out,) computing `x @ W.T + b`: `F.linear`'s semantics."""
    in_features: int
    out_features: int

    @nn.compact
    def __call__(self, x):
        init = torch_uniform_init(self.in_features)
        weight = self.param("weight", init, (self.out_features, self.in_features))
        bias = self.param("bias", init, (self.out_features,))
        return x @ weight.T + bias


ACTIVATIONS = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.1),
}


class ActivatedLinear(nn.Module):
    """A linear layer followed by an activation chosen by name from `ACTIVATIONS`.

    An unknown name raises when the module is built: read as identity, a typo would
    quietly train a linear model.
    """
    in_features: int
    out_features: int
    activation: str = "relu"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; "
                             f"known activations: {', '.join(sorted(ACTIVATIONS))}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ActivatedLinear expects {self.in_features} input features, got {x.shape[-1]}")
        return ACTIVATIONS[self.activation](Linear(self.out_features)(x))


class LinearRegression(nn.Module):
    """`nn.Linear(1, 1)`: y = w·x + b."""

    @nn.compact
    def __call__(self, x):  # (B, 1) -> (B, 1)
        return Linear(1)(x)


class RegressionNet(nn.Module):
    """ActivatedLinear(1, 20, relu) -> Linear(20, 1), the seed regression model."""

    @nn.compact
    def __call__(self, x):  # (B, 1) -> (B, 1)
        return Linear(1)(ActivatedLinear(1, 20, "relu")(x))


class Net(nn.Module):
    """784 -> 10, a linear classifier for flattened MNIST."""

    @nn.compact
    def __call__(self, x):
        return Linear(10)(x.reshape(x.shape[0], -1))


class SimpleNet(nn.Module):
    """784 -> 128 -> ReLU -> 10."""
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Linear(128, dtype=self.dtype)(x))
        return Linear(10, dtype=self.dtype)(x)


class CNN(nn.Module):
    """Conv 3->16 (3x3, no padding) -> ReLU -> flatten -> Linear(16*14*14, 10), for 16x16x3 input."""
    dtype: Any = None

    @nn.compact
    def __call__(self, x):  # (B, 16, 16, 3)
        fan_in = 3 * 3 * x.shape[-1]
        x = Conv(16, (3, 3), padding="VALID", dtype=self.dtype,
                 kernel_init=torch_uniform_init(fan_in), bias_init=torch_uniform_init(fan_in))(x)
        x = nn.relu(x)  # (B, 14, 14, 16)
        return Linear(10, dtype=self.dtype)(x.reshape(x.shape[0], -1))


class DynamicNet(nn.Module):
    """10 -> 20 -> 20 -> 5, where `use_shortcut` skips the middle layer.

    `use_shortcut` may be a Python bool (each value traces its own program) or a traced
    boolean array (one program; the branch is taken at run time by `lax.cond`).
    """

    @nn.compact
    def __call__(self, x, use_shortcut=False):
        hidden, middle, out = Linear(20, name="hidden"), Linear(20, name="middle"), Linear(5, name="out")
        h = nn.relu(hidden(x))
        if self.is_initializing():
            middle(h)  # create the middle layer's params whichever path init takes
        if isinstance(use_shortcut, bool):
            h = h if use_shortcut else nn.relu(middle(h))
        else:
            h = nn.cond(use_shortcut, lambda m, v: v, lambda m, v: nn.relu(middle(v)), self, h)
        return out(h)


class VariableDepthMLP(nn.Module):
    """An MLP whose number of hidden layers is chosen per call, up to `max_depth`.

    The hidden layers' params are stacked, (max_depth, F, F), and `depth` may be a traced
    integer: `lax.fori_loop` runs the first `depth` layers, so one program serves every depth.
    """
    hidden: int = 32
    out_features: int = 1
    max_depth: int = 8

    @nn.compact
    def __call__(self, x, depth):
        h = nn.relu(Linear(self.hidden, name="input")(x))
        init = torch_uniform_init(self.hidden)
        kernels = self.param("hidden_kernels", init, (self.max_depth, self.hidden, self.hidden))
        biases = self.param("hidden_biases", init, (self.max_depth, self.hidden))
        h = lax.fori_loop(0, jnp.minimum(depth, self.max_depth),
                          lambda i, v: nn.relu(v @ kernels[i] + biases[i]), h)
        return Linear(self.out_features, name="output")(h)


class RecurrentNet(nn.Module):
    """A tanh RNN cell (`torch.nn.RNNCell`'s layout and math) unrolled by `lax.scan`.

    `__call__(x, n_steps)`: x (B, T, input_size); runs the first `n_steps` <= T steps
    from a zero state and returns every hidden state, (B, n_steps, hidden_size).
    """
    hidden_size: int = 8

    @nn.compact
    def __call__(self, x, n_steps=None):
        batch, length, features = x.shape
        n_steps = length if n_steps is None else n_steps
        if not 0 < n_steps <= length:
            raise ValueError(f"n_steps={n_steps} must be in 1..{length} (the sequence length)")
        h_size = self.hidden_size
        init = torch_uniform_init(h_size)  # torch.nn.RNNCell: every weight and bias U(±1/sqrt(hidden))
        w_ih = self.param("weight_ih", init, (h_size, features))
        w_hh = self.param("weight_hh", init, (h_size, h_size))
        b_ih = self.param("bias_ih", init, (h_size,))
        b_hh = self.param("bias_hh", init, (h_size,))

        def cell(h, x_t):
            h = jnp.tanh(x_t @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
            return h, h

        xs = jnp.swapaxes(x[:, :n_steps], 0, 1)  # (n_steps, B, features)
        _, hs = lax.scan(cell, jnp.zeros((batch, h_size), x.dtype), xs)
        return jnp.swapaxes(hs, 0, 1)
