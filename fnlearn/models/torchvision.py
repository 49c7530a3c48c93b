"""torchvision's ResNet weights in and out of fnlearn's ResNets.

    model, variables = from_torchvision("resnet50", "resnet50-11ad3fa6.pth")
    to_torchvision(variables, "resnet50.safetensors")  # loads with strict=True in torchvision

fnlearn's module names follow torch's (`layer1_0/downsample_conv` is `layer1.0.downsample.0`),
so the map is by name; only the layouts differ: conv kernels HWIO vs OIHW, Dense kernels
(in, out) vs Linear weights (out, in), BatchNorm `scale` vs `weight` and `batch_stats`
`mean` / `var` vs buffers `running_mean` / `running_var`. torch's unbiased running variance
goes into flax's `var` as is: eval outputs match (see `resnet.batch_norm`).
"""
import contextlib
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from fnlearn.models import registry

RESNETS = ("resnet18", "resnet34", "resnet50")
# Flax module and leaf names -> torch's; a `layer{i}_{j}` module is torch's `layer{i}.{j}`.
MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


class WeightsError(ValueError):
    """A weights file that fnlearn cannot read, or that does not fit the model it is loaded into."""


def torch_key(names):
    """The torch state_dict key of a flax variable's names.

    ("layer1_0", "downsample_bn", "scale") -> "layer1.0.downsample.1.weight".
    """
    *modules, leaf = names
    modules = [MODULES.get(n, n.replace("_", ".") if n.startswith("layer") else n) for n in modules]
    return ".".join([*modules, LEAVES.get(leaf, leaf)])


def torch_axes(names, ndim):
    """The transpose that takes a flax leaf to torch's layout: kernels HWIO -> OIHW, (in, out) -> (out, in)."""
    if names[-1] != "kernel":
        return tuple(range(ndim))
    return (ndim - 1, ndim - 2, *range(ndim - 2))  # (..., I, O) -> (O, I, ...), for any conv rank


def _torch(purpose):
    """torch, imported only where a PyTorch file is read or written: fnlearn does not need it otherwise."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{purpose} needs PyTorch: pip install torch, or use a .safetensors file") from None
    return torch


def _unreadable(path, error):
    """The WeightsError for a file torch.load or safetensors refused, with the line that says why."""
    if isinstance(error, OSError):
        return WeightsError(f"cannot read {path}: {error.strerror or error}")
    lines = str(error).splitlines() or [""]
    # torch's weights-only refusal is a page of advice; the sentence that names the culprit is this.
    culprits = [line.split("error:", 1)[1].split(". ")[0].strip()
                for line in lines if "WeightsUnpickler error:" in line]
    if culprits:  # empty where the file is no pickle at all: the type is all torch says then
        reason = culprits[0] or type(error).__name__
    else:
        reason = f"{type(error).__name__}: {lines[0]}"
    kind = ("a safetensors file" if path.endswith(".safetensors")
            else "a state_dict torch.load(weights_only=True) reads")
    return WeightsError(f"{path} is not {kind} ({reason})")


def read_state_dict(path):
    """Reads a torch state_dict from a `.safetensors` file (no torch needed) or a `torch.save` file.

    Args:
      path: the file. A torch file may also hold the state dict under "state_dict" or "model",
        as training checkpoints do.
    Returns:
      dict of str -> np.ndarray in the file's order; bfloat16 tensors come as float32 from a
      torch file (numpy has no bfloat16 of torch's) and as ml_dtypes' bfloat16 from safetensors.
    Raises:
      WeightsError: the file cannot be read or does not hold a mapping of names to tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"no file at {path}")
    if path.endswith(".safetensors"):
        try:  # framework="flax": its bfloat16 support is older than the numpy one's
            with safetensors.safe_open(path, framework="flax") as f:
                return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
        except Exception as e:
            raise _unreadable(path, e) from None
    torch = _torch(f"reading {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of names to tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path} is not a state dict of names to tensors: "
                               f"{key!r} is a {type(value).__name__}")
    # numpy has no bfloat16 of torch's; float32 holds it exactly.
    # detach: a file of nn.Parameters (`dict(model.named_parameters())`) loads needing grad.
    return {key: (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy() for key, t in obj.items()}


def load_state_dict(state, shapes, source, arch):
    """Maps a torch state_dict onto flax variables of the given structure, checking every key.

    Args:
      state: dict of torch key -> np.ndarray in torch's layout.
      shapes: the model's variables as `jax.ShapeDtypeStruct`s (`jax.eval_shape(model.init, ...)`).
      source, arch: the file and the architecture, for the error messages.
    Returns:
      variables with the structure of `shapes`, jax arrays in their dtypes.
    Raises:
      WeightsError: naming the first key of `state` with no place or the wrong shape, else the
        first key the model needs that `state` lacks.
    """
    expected = {}  # torch key -> (flax names, shape in torch's layout)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(k.key for k in path[1:])  # past the collection ("params", "batch_stats")
        expected[torch_key(names)] = names, tuple(leaf.shape[i] for i in torch_axes(names, leaf.ndim))
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked" and f"{module}.running_mean" in expected:
            continue  # torch's count of training batches: flax keeps none
        if key not in expected:
            raise WeightsError(f"{source}: {key} has no place in {arch} (weights of another architecture?)")
        if value.shape != expected[key][1]:
            raise WeightsError(f"{source}: {key}: file {value.shape}, {arch} expects {expected[key][1]}")
    missing = [key for key in expected if key not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source} lacks {missing[0]}{more}, which {arch} needs")

    def leaf(path, struct):
        names = tuple(k.key for k in path[1:])
        flax_axes = np.argsort(torch_axes(names, struct.ndim))  # the inverse transpose
        return jnp.asarray(state[torch_key(names)].transpose(flax_axes), struct.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def from_torchvision(name, path, **model_kwargs):
    """Builds fnlearn's ImageNet-stem ResNet `name` holding torchvision weights from `path`.

    Args:
      name: torchvision's model name: "resnet18", "resnet34" or "resnet50".
      path: a `.safetensors` file, or a `torch.save`d state_dict (read with weights_only=True;
        needs torch).
      **model_kwargs: fields of the fnlearn model (e.g. dtype, param_dtype); `num_classes` is
        taken from the rows of `fc.weight`.
    Returns:
      (model, variables): `models.get(f"{name}_imagenet", ...)` and its {"params", "batch_stats"},
      params cast to the model's param_dtype.
    Raises:
      ValueError: `name` is not one of the above.
      WeightsError: the file is not a state dict, or one key of it does not fit the model.
    """
    if name not in RESNETS:
        raise ValueError(f"unknown torchvision model {name!r}; choose one of {', '.join(RESNETS)}")
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        shape = "no fc.weight" if fc is None else f"fc.weight of shape {fc.shape}"
        raise WeightsError(f"{path} has {shape}; {name} needs a (num_classes, features) fc.weight")
    model = registry.get(f"{name}_imagenet", num_classes=fc.shape[0], **model_kwargs)
    # Parameter shapes do not depend on the image size: any will do, and eval_shape allocates nothing.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    return model, load_state_dict(state, shapes, os.fspath(path), name)


def to_torchvision(variables, path=None):
    """fnlearn variables as a torch state_dict, e.g. for torchvision's ResNets.

    Args:
      variables: {"params", optionally "batch_stats"} of a model whose module names follow
        torch's (`conv1`, `layer2_0/downsample_conv`, `fc`, ...).
      path: if given, the state dict is also written there: `.safetensors` with safetensors,
        otherwise with `torch.save` (needs torch). Written to a temporary file first, then
        renamed, so a killed write leaves no half-written file at `path`.
    Returns:
      dict of torch key -> float32 np.ndarray in torch's layout (conv weights OIHW, Linear
      weights (out, in)), plus a 0-d int64 `num_batches_tracked` of 0 per BatchNorm, so that
      `load_state_dict(strict=True)` accepts it where every torch parameter has an fnlearn
      one (the ResNets; not FastNet, whose BatchNorm has no scale).
    """
    state = {}
    for collection in ("params", "batch_stats"):
        for path_, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
            names = tuple(k.key for k in path_)
            array = np.array(leaf, np.float32)  # a writable copy: torch.from_numpy wants one
            state[torch_key(names)] = np.ascontiguousarray(array.transpose(torch_axes(names, array.ndim)))
            if names[-1] == "mean":
                state[torch_key((*names[:-1], "num_batches_tracked"))] = np.zeros((), np.int64)
    if path is not None:
        _write(state, os.fspath(path))
    return state


def _write(state, path):
    """Writes `state` to `path` by way of a temporary file in the same folder and an atomic rename."""
    # Not mkstemp: its file is private (0600); this one gets the umask's permissions, as `path` would.
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    torch = None if path.endswith(".safetensors") else _torch(f"writing {path}")
    try:
        if torch is None:
            safetensors.numpy.save_file(state, tmp)
        else:
            torch.save({key: torch.from_numpy(a) for key, a in state.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # the save may have failed before creating it
            os.remove(tmp)
        raise
