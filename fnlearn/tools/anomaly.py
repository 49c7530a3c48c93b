"""Where a NaN or Inf first appears: `torch.autograd.set_detect_anomaly`'s analogue for Flax models.

`find_anomaly` runs one forward and backward pass of a loss and checks, in the order they
are computed, the parameters, every submodule's output, the loss, every submodule's output
gradient and the parameters' gradients, and names the first that is not finite. The pass is
jitted, its checks `jax.debug.callback`s numbered as they are traced; a training loop calls
it once, on the last finite state and the batch that broke it.
"""
import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fnlearn.pytrees import path_name


@dataclasses.dataclass(frozen=True)
class Anomaly:
    """The first non-finite value: `where` is "parameter", "forward", "loss", "backward" or "gradient";
    `name` the leaf or module path; `count` its non-finite elements out of `size`."""
    where: str
    name: str
    count: int
    size: int

    def __str__(self):
        what = {"parameter": f"parameter {self.name}", "forward": f"the output of {self.name} (forward)",
                "loss": "the loss", "backward": f"the gradient of {self.name}'s output (backward)",
                "gradient": f"the gradient of parameter {self.name}"}[self.where]
        return f"first NaN/Inf: {what}, {self.count} of {self.size} elements"


def _nonfinite(x):
    x = np.asarray(x)
    return int(np.size(x) - np.isfinite(x).sum()), int(np.size(x))


def find_anomaly(loss_fn, variables, *args):
    """The first non-finite value of one forward and backward pass of `loss_fn`, or None.

    Args:
      loss_fn: `loss_fn(params, *args) -> scalar`, which runs the model's `apply` (its submodules are
        watched while it runs).
      variables: the model's variables; `variables["params"]` is what the gradients are taken of.
      *args: the batch (and anything else `loss_fn` takes). Parameters and arguments are copied to the
        host and the pass runs on the default device; arrays `loss_fn` closes over should be host
        arrays too (`jax.device_get`).
    Returns:
      an `Anomaly`, or None when every value was finite.
    """
    # Each check is numbered while the pass is traced: the forward in the order it runs, the backward
    # in the order JAX transposes it (the reverse). The callbacks themselves may run in any order
    # (unordered ones work on several devices), so the first anomaly is the lowest number.
    events, counter = [], itertools.count()

    def record(number, where, name, x):
        count, size = _nonfinite(x)
        events.append((number, where, name, count, size))

    def watch(where, name, x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            jax.debug.callback(functools.partial(record, next(counter), where, name), x)
        return x

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def watch_backward(x, name):
        return x

    def backward(name, _, cotangent):
        jax.debug.callback(functools.partial(record, next(counter), "backward", name), cotangent)
        return (cotangent,)

    watch_backward.defvjp(lambda x, name: (x, None), backward)

    def interceptor(next_fun, call_args, kwargs, context):
        out = next_fun(*call_args, **kwargs)
        path = "/".join(context.module.path)
        if context.method_name != "__call__" or not path:
            return out
        return jax.tree.map(lambda y: watch_backward(watch("forward", path, y), path)
                            if jnp.issubdtype(y.dtype, jnp.inexact) else y, out)

    def loss(params, *args):
        with nn.intercept_methods(interceptor):
            return watch("loss", "loss", loss_fn(params, *args))

    # Copied to the host, so the pass runs on one device: a host callback inside a program split over
    # several CPU devices can stall the others in their collectives (measured: XLA's rendezvous aborts).
    params, args = jax.device_get((variables["params"], args))
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        record(-1, "parameter", path_name(keys), leaf)
    grads = jax.block_until_ready(jax.jit(jax.grad(loss))(params, *args))
    jax.effects_barrier()
    for keys, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        record(next(counter), "gradient", path_name(keys), leaf)
    first = min((e for e in events if e[3] > 0), default=None, key=lambda e: e[0])
    return None if first is None else Anomaly(*first[1:])
