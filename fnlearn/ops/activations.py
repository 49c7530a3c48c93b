"""Activations written so that XLA fuses them into one pass."""
import numpy as np
from jax import lax


def gelu(x):
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)): `torch.nn.GELU()`'s default.

    `jax.nn.gelu(x, approximate=False)` computes the same function through `erfc`,
    which XLA:CPU expands with an `exp` it will not duplicate, so a BatchNorm + GELU
    became four passes over the activations. `erf` lowers to one rational
    polynomial: the forward is a single fusion, 3.6x faster on a (512, 15, 15, 64)
    tensor on the 2-core CPU, and its gradient 1.8x faster (both forms timed
    interleaved in one process). The two agree to 1e-6.
    """
    return 0.5 * x * (1 + lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))
