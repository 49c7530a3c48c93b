"""A YOLO-style single-stage detector: a conv backbone, a top-down feature pyramid, and a head
per scale that predicts, at every grid cell, a box, an objectness logit and class logits.

YOLOv5's design at a small scale: conv-BN-SiLU blocks with residual stages, a feature
pyramid at strides 8 and 16, and YOLOv5's box parameterisation (`detection.boxes.decode`)
with one square anchor per scale, 32 and 64 pixels: one anchor is enough where every object
is square, and each is assigned to the cells around its centre on both scales
(`detection.loss`). Any input whose sides are multiples of 32 works. NHWC throughout.
"""
import math
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fnlearn.models import layers


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + SiLU, YOLOv5's `Conv` block."""
    features: int
    kernel: int = 3
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        pad = self.kernel // 2
        x = layers.Conv(self.features, (self.kernel, self.kernel), self.strides, padding=((pad, pad), (pad, pad)),
                        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        # YOLOv5's BatchNorm: momentum 0.03 (torch) is flax's 0.97; eps 1e-3.
        x = layers.BatchNorm(momentum=0.97, epsilon=1e-3, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="bn")(x, use_running_average=not train)
        return nn.silu(x)


class Residual(nn.Module):
    """1x1 halving the channels, 3x3 restoring them, plus the input (YOLOv5's `Bottleneck`)."""
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        block = partial(ConvBN, dtype=self.dtype, param_dtype=self.param_dtype)
        return x + block(self.features, 3, name="cv2")(block(self.features // 2, 1, name="cv1")(x, train), train)


def _upsample(x):
    """(B, H, W, C) -> (B, 2H, 2W, C), nearest neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class YOLO(nn.Module):
    """The detector. Returns one (B, H/s, W/s, 5 + num_classes) float32 map per stride s in
    `STRIDES`: 4 box numbers, the objectness logit and the class logits of every cell.

    Attributes:
      num_classes: the classes it tells apart.
      widths: channels of the five stride-2 stages (strides 2, 4, 8, 16, 32).
      depths: residual blocks after each stage's strided conv.
      neck: channels of the pyramid and the heads.
    """
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64, 128, 128)
    depths: Sequence[int] = (0, 1, 1, 1, 1)
    neck: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    STRIDES = (8, 16)
    ANCHORS = (32.0, 64.0)

    @nn.compact
    def __call__(self, x, train=False):
        block = partial(ConvBN, dtype=self.dtype, param_dtype=self.param_dtype)
        features = []
        for i, (width, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
            x = block(width, 3, 2, name=f"down{i}")(x, train)
            for j in range(depth):
                x = Residual(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"stage{i}_{j}")(x, train)
            features.append(x)
        # Top-down: each scale takes the coarser scale's features, upsampled, beside its own.
        p5 = block(self.neck, 1, name="lateral5")(features[4], train)
        p4 = block(self.neck, 3, name="merge4")(
            jnp.concatenate([_upsample(p5), block(self.neck, 1, name="lateral4")(features[3], train)], -1), train)
        p3 = block(self.neck, 3, name="merge3")(
            jnp.concatenate([_upsample(p4), block(self.neck, 1, name="lateral3")(features[2], train)], -1), train)
        outputs = []
        for level, p in enumerate((p3, p4)):
            y = block(self.neck, 3, name=f"head{level}")(p, train)
            y = layers.Conv(5 + self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                            bias_init=self._prior_bias, name=f"predict{level}")(y)
            outputs.append(y.astype(jnp.float32))
        return tuple(outputs)

    def _prior_bias(self, key, shape, dtype=jnp.float32):
        """Objectness starts at 1% and the classes equal (RetinaNet's prior, as YOLOv5 sets it), so the
        first steps are not spent pushing every empty cell's objectness down."""
        return jnp.zeros(shape, dtype).at[4].set(math.log(0.01 / 0.99))


YOLOTiny = YOLO
YOLOSmall = partial(YOLO, widths=(32, 64, 128, 256, 256), depths=(1, 1, 2, 2, 1), neck=96)
