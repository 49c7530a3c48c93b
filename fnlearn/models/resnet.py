"""ResNets (He et al., 2015) as in torchvision, in Flax Linen, with a CIFAR stem variant.

Layer names follow torchvision's so weights map one to one (`conv1`, `bn1`,
`layer{i}_{j}/conv1`, `.../downsample_conv`, `fc`). NHWC throughout.
"""
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fnlearn.models import layers

# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an
# untruncated normal (jax's `kaiming_normal` is truncated, hence variance_scaling).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(x, train, dtype, param_dtype, name):
    """BatchNorm with PyTorch's defaults (torch momentum 0.1 == flax momentum 0.9, eps 1e-5).

    Flax keeps the biased batch variance in `batch_stats/var` where torch keeps the
    unbiased one, so running variances differ by n / (n - 1); eval outputs from the
    same stored statistics are identical. The mode is a call argument, so
    `train.freeze` can keep a frozen layer in inference mode.

    Args:
      x: (..., C) activations.
      train: normalise with batch statistics and update `batch_stats` when True.
      dtype, param_dtype: compute and storage dtypes.
      name: the module's name (torchvision's, e.g. "bn1").
    Returns:
      x normalised over the last (channel) axis by a `layers.BatchNorm`.
    """
    return layers.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                            name=name)(x, use_running_average=not train)


def shortcut(x, features, strides, conv, norm):
    """Identity, or torchvision's 1x1 strided conv + BN where the shape changes.

    Args:
      x: (B, H, W, C_in) block input.
      features: channels of the residual branch's output.
      strides: stride of the residual branch.
      conv, norm: the block's conv constructor and BatchNorm (`batch_norm`; both carry the dtype policy).
    Returns:
      (B, H / strides, W / strides, features) shortcut activations.
    """
    if strides == 1 and x.shape[-1] == features:
        return x
    return norm(conv(features, (1, 1), strides, name="downsample_conv")(x), name="downsample_bn")


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; expansion 1.

    Attributes:
      features: channels of the block's output.
      strides: stride of the first conv (2 where a stage halves the resolution).
    """
    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Applies the block.

        Args:
          x: (B, H, W, C_in) activations.
          train: use batch statistics and update `batch_stats` when True.
        Returns:
          (B, H / strides, W / strides, features) activations.
        """
        conv = partial(layers.Conv, use_bias=False, kernel_init=conv_init,
                       dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(batch_norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype)
        # Explicit padding, not "SAME": for stride 2 on even sizes "SAME" pads (0, 1)
        # where torch pads (1, 1), which shifts the sampling grid.
        y = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(norm(y, name="bn1"))
        y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = norm(y, name="bn2")
        return nn.relu(y + shortcut(x, y.shape[-1], self.strides, conv, norm))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision v1.5), 1x1 expand by 4, plus shortcut.

    Attributes:
      features: channels of the middle convs; the output has 4 * features.
      strides: stride of the 3x3 conv.
    """
    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Applies the block.

        Args:
          x: (B, H, W, C_in) activations.
          train: use batch statistics and update `batch_stats` when True.
        Returns:
          (B, H / strides, W / strides, 4 * features) activations.
        """
        conv = partial(layers.Conv, use_bias=False, kernel_init=conv_init,
                       dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(batch_norm, train=train, dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.relu(norm(conv(self.features, (1, 1), name="conv1")(x), name="bn1"))
        y = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(norm(y, name="bn2"))
        y = norm(conv(self.features * self.expansion, (1, 1), name="conv3")(y), name="bn3")
        return nn.relu(y + shortcut(x, y.shape[-1], self.strides, conv, norm))


class ResNet(nn.Module):
    """A ResNet classifier; variants below fix `stage_sizes` and `block_cls`.

    Attributes:
      stage_sizes: blocks per stage; stage i has width * 2**i channels (times the
        block's expansion) and halves the resolution when i > 0.
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: logits per example.
      width: channels of the stem and first stage (64 in the paper).
      stem: "cifar" (3x3/1 conv, no pool: keeps 32x32 detail) or "imagenet"
        (7x7/2 conv + 3x3/2 max-pool).
      remat: recompute each residual block's activations in the backward pass
        (`layers.remat_block`): less memory, one more forward pass.
      dtype: compute dtype of every layer (e.g. jnp.bfloat16); logits come out in it.
      param_dtype: storage dtype of every parameter.
    """
    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int = 10
    width: int = 64
    stem: str = "cifar"
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Maps images to logits.

        Args:
          x: (B, H, W, 3) normalised images.
          train: use batch statistics and update `batch_stats` when True (pass
            `mutable=["batch_stats"]` to `apply`).
        Returns:
          (B, num_classes) logits in `dtype`; the loss casts to float32.
        """
        conv = partial(layers.Conv, self.width, use_bias=False, kernel_init=conv_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="conv1")
        if self.stem == "cifar":
            x = conv((3, 3), padding=((1, 1), (1, 1)))(x)
        elif self.stem == "imagenet":
            x = conv((7, 7), 2, padding=((3, 3), (3, 3)))(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; use 'cifar' or 'imagenet'")
        x = nn.relu(batch_norm(x, train, self.dtype, self.param_dtype, name="bn1"))
        if self.stem == "imagenet":
            x = layers.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = layers.remat_block(self.block_cls) if self.remat else self.block_cls
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = block(self.width * 2 ** i, strides=2 if i > 0 and j == 0 else 1, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"layer{i + 1}_{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pool: (B, C)
        # torch.nn.Linear's default init: kernel and bias U(+-1/sqrt(fan_in)).
        return nn.Dense(self.num_classes, kernel_init=layers.torch_kernel_init,
                        bias_init=layers.torch_uniform_init(x.shape[-1]),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet18ImageNet = partial(ResNet18, stem="imagenet")
ResNet34ImageNet = partial(ResNet34, stem="imagenet")
ResNet50ImageNet = partial(ResNet50, stem="imagenet")
# For tests: two single-block stages, 8 then 16 channels.
ResNetTiny = partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, width=8)
