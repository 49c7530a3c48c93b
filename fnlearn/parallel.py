"""Data parallel over a device mesh, the `jax.sharding` way (DDP's and FSDP's analogue).

One mesh axis, "data", over the devices. A batch is split on its leading axis; the
training state is replicated, or, FSDP-style, each leaf is split over the same axis along
one of its dimensions. The step is the single-device one: `jax.jit` is told the
shardings of what goes in and out, and XLA inserts the gradient all-reduce (and, for
split state, the all-gathers) itself, so the same code runs on one device or many.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def data_mesh(devices=None):
    """A one-axis ("data") `Mesh` over `devices` (default: every device, `jax.devices()`)."""
    return Mesh(np.array(jax.devices() if devices is None else devices), (DATA,))


def check_divides(mesh, sizes, accumulate=1):
    """Raises ValueError naming the argument if a batch size in `sizes` (name -> size) does not
    split evenly over the devices of `mesh` (and, with `accumulate`, each device's share into
    that many micro-batches)."""
    parts = mesh.size * accumulate
    for name, size in sizes.items():
        if size % parts:
            into = f"{mesh.size} devices" + (f" x {accumulate} micro-batches" if accumulate > 1 else "")
            raise ValueError(f"{name} {size} does not split over the {into}: pass a multiple of {parts}")


def batch_sharding(mesh, axis=0):
    """Split along `axis` (the batch axis) over the devices; every other axis whole."""
    return NamedSharding(mesh, P(*[None] * axis, DATA))


def replicated(mesh):
    """A whole copy on every device."""
    return NamedSharding(mesh, P())


def _split_spec(shape, n):
    """FSDP-style: split the largest dimension that divides by `n`; a leaf with none stays whole."""
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return P(*[None] * axis, DATA)
    return P()


def state_sharding(state, mesh, fsdp=False):
    """The sharding of each leaf of `state` (any pytree): replicated, or with `fsdp` split
    along its largest evenly divisible dimension (optimizer moments then split as their params)."""
    def leaf(x):
        return NamedSharding(mesh, _split_spec(np.shape(x), mesh.size) if fsdp else P())
    return jax.tree.map(leaf, state)
