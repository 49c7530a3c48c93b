"""The training state: one pytree carrying everything a step changes."""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Params, BatchNorm statistics, optimizer state and step count, as one pytree.

    `apply_fn` and `tx` are static: they are part of the compiled program, not its data.
    `batch_stats` is None for models without BatchNorm; `ema_params` is None unless
    an experiment keeps a weight average; `loss_scale` (a `precision.LossScale`) is None
    unless training computes in float16.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any = None
    ema_params: Any = None
    loss_scale: Any = None
    apply_fn: Any = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, apply_fn, variables, tx, ema=False, loss_scale=None):
        """Builds a state from `model.init(...)` output and an optax transform."""
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            batch_stats=variables.get("batch_stats"),
            ema_params=jax.tree.map(jnp.copy, params) if ema else None,
            loss_scale=loss_scale,
            apply_fn=apply_fn,
            tx=tx,
        )

    @property
    def variables(self):
        """The `variables` dict that `apply` takes."""
        if self.batch_stats is None:
            return {"params": self.params}
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, grads, **changes):
        """One optimizer update; `changes` replace other fields (e.g. batch_stats)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)
