"""Layers the zoo builds on. The conv and pool here are the ones every model uses,
so a faster lowering (chosen by backend in `fnlearn.ops`) reaches the whole zoo."""
from typing import Any

import flax.linen as nn

from fnlearn.ops.conv import conv_general_dilated
from fnlearn.ops.pool import max_pool


class Conv(nn.Conv):
    """`nn.Conv` whose convolution is `fnlearn.ops.conv_general_dilated`.

    Same attributes, parameters and results as `nn.Conv`; on CPU, 1x1 convs run as
    dots and other plain convs have gradients spelt in XLA:CPU's fast layouts (see
    `fnlearn.ops.conv`); every other backend gets lax's convolution.
    """
    conv_general_dilated: Any = conv_general_dilated


__all__ = ["Conv", "max_pool"]
