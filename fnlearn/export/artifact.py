"""A trained classifier as a file that runs without fnlearn's model code: StableHLO or ONNX.

Both formats hold the same function, uint8 images (B, H, W, C) -> float32 logits
(B, num_classes), with the normalisation and the weights inside, in eval mode, for any
batch size B, and the labels beside it:
- StableHLO (`.zip`, `jax.export`): `meta.json` and `exported.bin`, the serialized
  `jax.export.Exported`, lowered for CPU and CUDA at once. Any JAX of the same or a newer
  serialization version runs it: `jax.export.deserialize(bytes).call(images)`.
- ONNX (`.onnx`, `fnlearn.export.onnx`): BatchNorm folded into the convolutions, the labels
  and normalisation in the model's metadata_props; onnxruntime runs it.
"""
import json
import os
import pathlib
import zipfile

import numpy as np

import jax
import jax.numpy as jnp

from fnlearn.ops import onednn

FORMATS = ("stablehlo", "onnx")
PLATFORMS = ("cpu", "cuda")
_META, _EXPORTED = "meta.json", "exported.bin"


class ArtifactError(ValueError):
    """An artifact could not be written or read; the message names the file and what to do."""


def classifier(apply_fn, variables, mean, std):
    """The function an artifact holds: uint8 images -> logits of `apply_fn` in eval mode.

    Args:
      apply_fn: a Flax `model.apply`, taking `(variables, x, train=False)`.
      variables: the model's variables (the weights become constants of the artifact).
      mean, std: (C,) per-channel normalisation in [0, 1] units, as training used.
    Returns:
      `f(images)`: (B, H, W, C) uint8 -> (B, num_classes) float32 logits.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def logits(images):
        x = (images.astype(jnp.float32) / 255 - mean) / std
        return apply_fn(variables, x, train=False).astype(jnp.float32)

    return logits


def _spec(input_shape):
    batch, = jax.export.symbolic_shape("batch")
    return jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8)


def _write_atomically(path, write, check=None):
    """Calls `write(tmp_path)`, then `check(tmp_path)`, then renames into `path`: a killed or
    refused export leaves no half file, and the file already at `path` stays until then.

    Raises:
      ArtifactError: the file cannot be written (naming the folder and why).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ArtifactError(f"cannot write {path} ({e.strerror}): pick a folder you can write") from None
    finally:
        tmp.unlink(missing_ok=True)


def save(path, fn, input_shape, meta, format="stablehlo", platforms=PLATFORMS, check=None):
    """Writes `fn` (uint8 images -> logits, see `classifier`) as an artifact.

    Args:
      path: the file to write (`.zip` for StableHLO, `.onnx` for ONNX by convention).
      fn: the function to export.
      input_shape: (H, W, C) of one image; the batch stays dynamic.
      meta: JSON-able dict; `labels` (one name per logit) is what the server reads: without
        them the logits are named by their index ("0", "1", ...), as TorchServe names classes
        that have no mapping file.
      format: "stablehlo" or "onnx".
      platforms: StableHLO's lowering platforms (ONNX runs wherever onnxruntime does).
      check: called with the written file before it replaces `path`; what it raises
        leaves `path` as it was.
    Returns:
      the file's size in bytes.
    Raises:
      ArtifactError: a bad format or labels, or a file that cannot be written.
    """
    path = pathlib.Path(path)
    if format not in FORMATS:
        raise ArtifactError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    meta = {**meta, "input_shape": list(input_shape), "input_dtype": "uint8", "format": format}
    logits = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *input_shape), jnp.uint8)).shape[-1]
    meta.setdefault("labels", [str(i) for i in range(logits)])
    if len(meta["labels"]) != logits:  # the server names each logit by its label
        raise ArtifactError(f"{len(meta['labels'])} labels for {logits} logits: give one label a logit")
    # lax's convolutions in the jaxpr, which the ONNX converter reads (jax.export alone
    # would lower fnlearn's to lax): the file must run without fnlearn's library.
    with onednn.disabled():
        write = _serialize(fn, input_shape, meta, format, platforms)
    _write_atomically(path, write, check)
    return path.stat().st_size


def _serialize(fn, input_shape, meta, format, platforms):
    """A function writing the artifact's bytes to a path."""
    if format == "stablehlo":
        exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(_spec(input_shape))
        meta["platforms"] = list(platforms)

        def write(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr(_META, json.dumps(meta, indent=2))
                archive.writestr(_EXPORTED, bytes(exported.serialize()))
    else:
        from fnlearn.export import onnx as onnx_export
        model = onnx_export.export(fn, _spec(input_shape), input_names=["images"], output_names=["logits"],
                                   metadata={"fnlearn": json.dumps(meta)})
        write = lambda tmp: tmp.write_bytes(model.SerializeToString())  # noqa: E731
    return write


class Artifact:
    """A loaded artifact: `artifact(images)` maps uint8 (B, H, W, C) to float32 logits (B, N).

    Attributes:
      meta: the dict saved with it (`labels`, `input_shape`, `model`, ...).
      labels: one name per logit.
      input_shape: (H, W, C).
    """

    def __init__(self, meta, run):
        self.meta, self._run = meta, run
        self.input_shape = tuple(meta["input_shape"])
        self.labels = list(meta["labels"])

    def __call__(self, images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.input_shape:
            raise ArtifactError(f"expected uint8 images of shape (B, {', '.join(map(str, self.input_shape))}), "
                                f"got {images.dtype} {images.shape}")
        return np.asarray(self._run(images))


def platforms_here():
    """`jax.export`'s names for this process's backend: ("cuda", "rocm") for a GPU, else the backend's own."""
    return {"gpu": ("cuda", "rocm")}.get(jax.default_backend(), (jax.default_backend(),))


def _load_stablehlo(path):
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read(_META))
        exported = jax.export.deserialize(bytearray(archive.read(_EXPORTED)))
    here = platforms_here()
    if not any(p in exported.platforms for p in here):
        raise ArtifactError(f"{path} was lowered for {', '.join(exported.platforms)}, and JAX runs on "
                            f"{jax.default_backend()} here: export it again with --platforms {here[0]}")
    return Artifact(meta, jax.jit(exported.call))


def _load_onnx(path):
    try:
        import onnxruntime
    except ImportError:
        raise ArtifactError(f"{path} is ONNX, which needs onnxruntime: pip install -e '.[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the dynamic batch dim makes it warn at load
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["fnlearn"])
    return Artifact(meta, lambda images: session.run(["logits"], {"images": images})[0])


def load(path):
    """Reads an artifact `save` wrote (the format is told by its content, not its name).

    Raises:
      ArtifactError: the file is missing or is not an fnlearn artifact.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not an exported file: pass the .zip or .onnx file that "
                            "python -m experiments.export wrote")
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file; write one with python -m experiments.export")
    try:
        if zipfile.is_zipfile(path):
            return _load_stablehlo(path)
        return _load_onnx(path)
    except ArtifactError:
        raise
    except Exception as e:  # zip, JSON, jax and onnxruntime each raise their own types
        raise ArtifactError(f"{path} is not an fnlearn artifact (a StableHLO .zip or an .onnx file from "
                            f"python -m experiments.export): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
