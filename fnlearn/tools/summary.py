"""A model's layers with output shapes, parameters, bytes and FLOPs: torchsummary's analogue.

The per-layer table is flax's `nn.tabulate`, which traces each module call and takes XLA's
cost analysis of it as lowered (before XLA's optimisations): the forward (`flops`), and the
forward plus backward (`vjp_flops`: `jax.vjp` of the call, applied to its output). The
totals are XLA's cost analysis of the whole model's `apply` as compiled for this backend.
XLA counts a conv's or a matmul's multiply-adds as 2 FLOPs each (skipping padded taps), and
adds, activations and normalisation too. Where a backend gives no analysis of the lowered
program (flax then shows 0 a layer), the totals still come from the compiled one.
"""
import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import numpy as np

from fnlearn.ops import onednn


@onednn.disabled()  # XLA counts no FLOPs in a custom call
def cost_flops(fn, *args):
    """XLA's FLOP count of `fn(*args)` compiled for this backend (no computation runs)."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `summary` found; `str()` gives the table and the totals.

    Attributes:
      table: flax's per-layer table (path, module, inputs, outputs, flops, vjp_flops, variables).
      params: trainable parameters (the `params` collection), counted element by element.
      param_bytes: their bytes in storage.
      other: elements of the other collections (BatchNorm statistics), not trained.
      flops: the forward pass's FLOPs at this input.
      flops_with_backward: forward plus backward (the gradients of every input and parameter).
    """
    table: str
    params: int
    param_bytes: int
    other: int
    flops: float
    flops_with_backward: float

    def __str__(self):
        return (f"{self.table}\n"
                f"parameters: {self.params:,} ({self.param_bytes / 2**20:.2f} MiB); other variables: {self.other:,}\n"
                f"FLOPs at this input: forward {self.flops:,.0f} ({self.flops / 1e9:.3f} GFLOPs), forward + "
                f"backward {self.flops_with_backward:,.0f} ({self.flops_with_backward / 1e9:.3f} GFLOPs); "
                f"counted by XLA's cost analysis on {jax.default_backend()}")


def _takes_train(model):
    return "train" in inspect.signature(model.__call__).parameters


@onednn.disabled()
def summary(model, x, train=False, depth=None, width=160, **call_kwargs):
    """Summarises `model` on the input `x` (e.g. `jnp.zeros((1, 32, 32, 3))`); nothing is computed.

    Args:
      model: a Flax module.
      x: an example input (an array or a `jax.ShapeDtypeStruct`); its batch size scales the FLOPs.
      train: call the model in training mode (BatchNorm on batch statistics), if it has one.
      depth: rows down to this nesting depth (None: every module).
      width: the table's width in characters.
      **call_kwargs: further arguments of the model's call (e.g. `depth=` of `VariableDepthMLP`).
    Returns:
      a `Summary`; print it.
    """
    kwargs = {**({"train": train} if _takes_train(model) else {}), **call_kwargs}
    key = jax.random.key(0)
    table = nn.tabulate(model, key, depth=depth, compute_flops=True, compute_vjp_flops=True,
                        console_kwargs={"width": width, "force_terminal": False})(x, **kwargs)
    variables = jax.eval_shape(functools.partial(model.init, **kwargs), key, x)
    mutable = [name for name in variables if name != "params"] if train else False

    def forward(variables, x):
        out = model.apply(variables, x, mutable=mutable, **kwargs)
        return out[0] if mutable else out

    def forward_backward(variables, x):
        out, vjp = jax.vjp(forward, variables, x)
        return vjp(out)

    params = jax.tree.leaves(variables.get("params", {}))
    other = [leaf for name, tree in variables.items() if name != "params" for leaf in jax.tree.leaves(tree)]
    return Summary(table=table, params=sum(int(np.prod(p.shape)) for p in params),
                   param_bytes=sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in params),
                   other=sum(int(np.prod(p.shape)) for p in other),
                   flops=cost_flops(forward, variables, x), flops_with_backward=cost_flops(forward_backward, variables, x))
