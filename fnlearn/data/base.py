"""What every loader returns, its error type, and the TFDS prepare-then-read step they share."""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# Examples deserialized per `__getitems__` call: large enough that array_record
# reads in bulk, small enough that the per-chunk list of dicts stays a few MB.
_READ_CHUNK = 4096


class DataError(ValueError):
    """A data source is missing, malformed or cannot be fetched; the message names it."""


class Dataset(NamedTuple):
    """A whole image classification data set held in host memory.

    Attributes:
      train_images: (N, H, W, C) uint8.
      train_labels: (N,) int32 indices into `class_names`.
      test_images: (M, H, W, C) uint8.
      test_labels: (M,) int32.
      class_names: class names in label order (sorted folder names for folders).
      source: the folder, archive or dataset name it was loaded from.
      skipped: corrupt images left out when preparing with `skip_corrupt=True`.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    skipped: int = 0


def image_features(shape: tuple[int, int, int], class_names) -> tfds.features.FeaturesDict:
    """The features every fnlearn builder stores: a raw uint8 image and its class.

    TFDS's `Image` feature needs TensorFlow to encode and decode; raw pixels need
    nothing, and read back with no decoding at all.

    Args:
      shape: (H, W, C) of every image.
      class_names: class names in label order.

    Returns:
      A FeaturesDict with `image` (uint8 Tensor of `shape`) and `label` (ClassLabel).
    """
    return tfds.features.FeaturesDict({
        # BYTES stores the pixels as one string: 10x faster to write and 2x
        # faster to read than the default int64 list.
        "image": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=list(class_names)),
    })


class LocalInfo(tfds.core.DatasetInfo):
    """`DatasetInfo` for fnlearn's builders, which are never on TFDS's GCS bucket.

    A builder whose data is not prepared yet asks TFDS to look up its info in
    that bucket, and TFDS leaves an empty `tmp*tfds` folder in the temp dir on
    every such lookup. There is nothing to look up, so this skips it.
    """

    def initialize_from_bucket(self) -> None:
        return None


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of fnlearn's image builders: fixes how TFDS finds their source file."""

    # TFDS's own lookup of the defining file imports `importlib_resources`, which
    # TFDS does not install; the folder (where a checksums.tsv would go) is known.
    code_path = epath.Path(__file__)


def default_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The TFDS data dir to use: `data_dir`, else TFDS's default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

    Args:
      data_dir: a directory, or None for TFDS's default.

    Returns:
      An absolute path.
    """
    chosen = data_dir if data_dir is not None else tfds.core.constants.get_default_data_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Writes the builder's array_record files unless a complete copy already exists.

    TFDS writes into a `*.incomplete*` temp dir and renames it on success, so an
    interrupted run leaves nothing that a later run mistakes for a finished one.

    Args:
      builder: a builder constructed with `file_format='array_record'`.
    """
    # The GCS lookup would be a network round trip (minutes of retries offline)
    # for data sets that Google never hosts.
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(download_config=config)


def _read_split(source, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split of an array_record data source into preallocated arrays."""
    n = len(source)
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _READ_CHUNK):
        stop = min(start + _READ_CHUNK, n)
        examples = source.__getitems__(range(start, stop))
        images[start:stop] = np.stack([ex["image"] for ex in examples])
        labels[start:stop] = [ex["label"] for ex in examples]
    return images, labels


def read_prepared(builder: tfds.core.DatasetBuilder, source: str) -> Dataset:
    """Reads a prepared image classification builder into in-memory uint8 arrays.

    Args:
      builder: a prepared builder whose features are `image` (uint8 Tensor,
        (H, W, C)) and `label` (ClassLabel), with `train` and `test` splits.
      source: what to record as `Dataset.source`.

    Returns:
      The `Dataset`, with `skipped` taken from the stored metadata (0 if absent).
    """
    sources = builder.as_data_source()
    shape = tuple(builder.info.features["image"].shape)
    train_images, train_labels = _read_split(sources["train"], shape)
    test_images, test_labels = _read_split(sources["test"], shape)
    metadata = builder.info.metadata or {}
    return Dataset(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(builder.info.features["label"].names),
        source=source,
        skipped=int(metadata.get("skipped", 0)),
    )
