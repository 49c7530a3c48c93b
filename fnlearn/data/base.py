"""The TFDS prepare-then-read step every builder shares."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from fnlearn.data.dataset import DataError, Dataset

# Examples deserialized per `__getitems__` call: large enough that array_record
# reads in bulk, small enough that the per-chunk list of dicts stays a few MB.
_READ_CHUNK = 4096


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
        # BYTES stores the pixels as one string, which writes and reads much
        # faster than the default list of int64s.
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


@contextlib.contextmanager
def quiet_tfds():
    """Hides TFDS's log records below ERROR, and its progress bars unless stderr is a terminal.

    TFDS logs (through absl's logger) a warning that dumps a custom builder
    config whole, at every construction; its bars leave carriage-return litter
    in logs and captured output, while on a terminal they show work done and
    erase themselves. Both settings are restored on exit.
    """
    absl_logger = logging.getLogger("absl")
    # TFDS has a setter for its bar switch but no getter.
    level, bars = absl_logger.level, tqdm_utils._active
    absl_logger.setLevel(logging.ERROR)
    tfds.display_progress_bar(bars and sys.stderr.isatty())
    try:
        yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(bars)


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of fnlearn's image builders: fixes how TFDS finds their source file, and quiets TFDS."""

    # TFDS's own lookup of the defining file imports `importlib_resources`, which
    # TFDS does not install; the folder (where a checksums.tsv would go) is known.
    code_path = epath.Path(__file__)

    def __init__(self, **kwargs):
        # Constructing a builder with a custom config (the folder builder) logs its dump.
        with quiet_tfds():
            super().__init__(**kwargs)

    # TFDS prints (with termcolor, to stdout) a size estimate before preparing, "Unknown
    # size" for a local folder, and a line when done; `prepare` prints one line instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


def default_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The TFDS data dir to use: `data_dir`, else TFDS's default (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

    Every loader calls this first, so a data dir that can never be created fails
    before any extraction or preparation, not deep inside TFDS. A missing one is
    created here: TFDS would create it on the first preparation anyway.

    Args:
      data_dir: a directory, or None for TFDS's default.

    Returns:
      An absolute path to an existing folder.

    Raises:
      DataError: when the path, or the nearest of its parents that exists, is not a
        folder, or the folder cannot be created.
    """
    chosen = data_dir if data_dir is not None else tfds.core.constants.get_default_data_dir()
    path = os.path.abspath(os.path.expanduser(os.fspath(chosen)))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    hint = "pass --data-dir (data_dir=) a folder; it is created if missing"
    if not os.path.isdir(existing):
        where = "is not a folder" if existing == path else f"is under {existing}, which is not a folder"
        raise DataError(f"data dir {path} {where}: {hint}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise DataError(f"data dir {path} cannot be created ({err.strerror}): {hint}") from None
    return path


def prepare(builder: ImageBuilder, source: str) -> None:
    """Writes the builder's array_record files unless a complete copy already exists.

    TFDS writes into a `*.incomplete*` temp dir and renames it on success, so an
    interrupted run leaves nothing that a later run mistakes for a finished one.
    Two processes preparing the same copy take turns (a lock file beside it): the
    second reads what the first wrote, where TFDS's rename would fail. Where the file
    system has no locks (some network mounts), preparation goes on without one.
    Preparing prints one line to stderr, with the progress bars, so that stdout keeps
    only what the program reports; reading a prepared copy prints nothing.

    Args:
      builder: a builder constructed with `file_format='array_record'`.
      source: what is prepared, for the line printed.

    Raises:
      DataError: when the prepared files cannot be written.
    """
    if builder.data_path.exists():  # TFDS's own test for "already prepared"; it read the copy's info
        return
    folder = builder.data_path.parent  # the config's, holding one folder per version
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = os.open(folder / ".fnlearn-prepare.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise DataError(f"cannot write prepared files to {folder} ({err.strerror}): pass --data-dir (data_dir=) "
                        "a folder you can write") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if builder.data_path.exists():  # another process prepared it while this one waited
            builder.info.read_from_directory(builder.data_dir)
            return
        print(
            f"preparing {source} once as array_record files in {builder.data_dir} (later runs read them back)",
            file=sys.stderr,
        )
        # The GCS lookup would be a network round trip (minutes of retries offline)
        # for data sets that Google never hosts.
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        with quiet_tfds():
            builder.download_and_prepare(download_config=config)
    except OSError as err:  # a full disk, a read-only folder, an unreadable file
        hint = (": pass --data-dir (data_dir=) a folder you can write, with room"
                if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT) else "")
        raise DataError(f"cannot prepare {source} in {folder}: {err}{hint}") from None
    finally:
        os.close(lock)  # and with it the lock


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
      The `Dataset`, with `skipped` taken from the stored metadata (empty if absent).
    """
    sources = builder.as_data_source()
    shape = tuple(builder.info.features["image"].shape)
    train_images, train_labels = _read_split(sources["train"], shape)
    test_images, test_labels = _read_split(sources["test"], shape)
    skipped = (builder.info.metadata or {}).get("skipped") or ()
    if isinstance(skipped, int):  # prepared by an fnlearn that stored only the count
        skipped = ("(name not recorded)",) * skipped
    return Dataset(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(builder.info.features["label"].names),
        source=source,
        skipped=tuple(skipped),
    )
