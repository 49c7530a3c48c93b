"""Precision policies, in one place, and float16's dynamic loss scale (`torch.amp.GradScaler`'s).

Every policy keeps params and optimizer state in float32 and computes losses and BatchNorm
statistics in float32 (`losses.py`; flax's BatchNorm reduces 16-bit inputs in float32);
what changes is the dtype the layers compute in. float16's 5 exponent bits lose small
gradients to underflow, so its policy scales the loss up before the backward pass and
the gradients back down after it; bfloat16 has float32's exponent range and needs no scale.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
    """`compute_dtype`: what the layers compute in; `loss_scale`: whether training needs a `LossScale`."""
    compute_dtype: Any
    loss_scale: bool = False


POLICIES = {
    "fp32": Policy(jnp.float32),
    "bf16": Policy(jnp.bfloat16),
    "fp16": Policy(jnp.float16, loss_scale=True),
}


class LossScale(struct.PyTreeNode):
    """A dynamic loss scale, part of the `TrainState` (so it is checkpointed with it).

    `make_train_step` multiplies the loss by `scale` before differentiating and divides the
    gradients by it; a step whose gradients hold Inf or NaN is skipped. `adjust` then
    halves the scale after such a step and doubles it after `growth_interval` finite steps
    in a row: GradScaler's defaults and rule, but for a floor of 1. Below 1 the scale would
    shrink real gradients; an overflow at 1 is the gradients' own, a divergence (`diverged`),
    where GradScaler would skip steps without end.
    """
    scale: jax.Array
    good_steps: jax.Array  # finite steps since the scale last changed
    growth_interval: int = struct.field(pytree_node=False, default=2000)
    growth_factor: float = struct.field(pytree_node=False, default=2.0)
    backoff_factor: float = struct.field(pytree_node=False, default=0.5)

    @classmethod
    def create(cls, scale=2.0**16, growth_interval=2000):
        return cls(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                   growth_interval=growth_interval)

    def adjust(self, finite):
        """The scale after a step whose gradients were all finite (`finite`, a bool array) or not."""
        due = finite & (self.good_steps + 1 >= self.growth_interval)
        grown = self.scale * self.growth_factor
        # A growth past float32's range is not taken (as GradScaler's): an Inf scale would skip
        # every step from then on, and backing off from Inf stays Inf.
        scale = jnp.where(finite, jnp.where(due & jnp.isfinite(grown), grown, self.scale),
                          jnp.maximum(self.scale * self.backoff_factor, 1.0))
        return self.replace(scale=scale, good_steps=jnp.where(finite & ~due, self.good_steps + 1, 0))

    @staticmethod
    def diverged(scale, skipped):
        """Whether steps skipped (`skipped`) at `scale` mean the training diverged: at the floor.
        Takes arrays, device or host (a run's stacked metrics)."""
        return skipped & (scale <= 1.0)
