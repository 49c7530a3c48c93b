"""CIFAR-10 and MNIST fetched from their original URLs and parsed with NumPy, no TensorFlow.

TFDS's own `cifar10`/`mnist` builders read their downloads through `tf.io.gfile`,
and TFDS's archive extraction needs TensorFlow too, so these builders download
through TFDS's download manager (`dl_manager.download`: caching, checksums) and
read the archives directly: CIFAR-10's binary tar.gz with `tarfile`, MNIST's idx
files with `gzip`.
"""
from __future__ import annotations

import abc
import gzip
import os
import socket
import tarfile
import threading
import urllib.parse

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

from fnlearn.data.base import ImageBuilder, LocalInfo, default_data_dir, image_features, prepare, read_prepared
from fnlearn.data.dataset import DataError, Dataset

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_RECORD = 1 + 3 * 32 * 32  # label byte, then the image as CHW planes
_OFFLINE_HINT = (
    "Pass --data PATH instead: a folder or .tar.gz holding <root>/{train,test}/<class>/*.jpg "
    "(or *.png), where <root> is PATH itself or its single subfolder."
)



class _DownloadFailed(DataError):
    """The data could not be fetched (as opposed to fetched and found malformed)."""


# idx type codes (third byte of the magic number) to big-endian NumPy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_cifar10_batch(data: bytes, name: str = "CIFAR-10 batch") -> tuple[np.ndarray, np.ndarray]:
    """Parses one CIFAR-10 binary batch file (records of 1 label byte + 3072 CHW pixel bytes).

    Args:
      data: the file's bytes.
      name: what to call the file in errors.

    Returns:
      `(images, labels)`: (N, 32, 32, 3) uint8 and (N,) int32.

    Raises:
      DataError: when the size is not a whole number of records or a label is not 0..9.
    """
    if not data or len(data) % _CIFAR10_RECORD:
        raise DataError(f"{name}: {len(data)} bytes is not a whole number of {_CIFAR10_RECORD}-byte records")
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int32)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"{name}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10_archive(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads `cifar-10-binary.tar.gz` without extracting it to disk.

    Args:
      path: the archive, holding `*/data_batch_{1..5}.bin` and `*/test_batch.bin`.

    Returns:
      `{"train": (images, labels), "test": (images, labels)}`, images (N, 32, 32, 3)
      uint8, train batches in order 1..5.
    """
    train_names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    batches = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isfile() and base in (*train_names, "test_batch.bin"):
                batches[base] = parse_cifar10_batch(tar.extractfile(member).read(), f"{path}:{member.name}")
    missing = [n for n in (*train_names, "test_batch.bin") if n not in batches]
    if missing:
        raise DataError(f"archive {path} lacks {', '.join(missing)}")
    train = [batches[n] for n in train_names]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches["test_batch.bin"],
    }


def parse_idx(data: bytes, name: str = "idx file") -> np.ndarray:
    """Parses an idx file (MNIST's format: magic 0,0,type,ndim; big-endian int32 dims; data).

    Args:
      data: the uncompressed file's bytes.
      name: what to call the file in errors.

    Returns:
      The array with the file's shape, in native byte order.

    Raises:
      DataError: on a bad magic number, unknown type, or size that does not match the dims.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an idx file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4)) if len(data) >= header else None
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if shape is None or len(data) - header != dtype.itemsize * int(np.prod(shape)):
        raise DataError(f"{name}: {len(data)} bytes do not match the header's shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_gz(path: str | os.PathLike) -> np.ndarray:
    """Reads a gzipped idx file.

    Args:
      path: e.g. `train-images-idx3-ubyte.gz`.

    Returns:
      The array (see `parse_idx`).
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read gzip file {path}: {err}") from None
    return parse_idx(data, str(path))


_PROBE_SECONDS = 10.0
_ONE_TRY = threading.Lock()


def check_reachable(urls, timeout: float = _PROBE_SECONDS) -> None:
    """Fails at once when a URL's host cannot be reached directly.

    TFDS's downloader retries a dead connection 10 times with exponential
    backoff, minutes offline; one plain connection attempt fails at once when
    there is no network (name resolution fails). A failure here is not final:
    TFDS may hold the download already, or a proxy may reach the host.

    Args:
      urls: the URLs about to be downloaded.
      timeout: seconds to wait for each host to accept a connection.

    Raises:
      DataError: (a `_DownloadFailed`) naming the URL that cannot be reached.
    """
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as err:
            raise _DownloadFailed(f"could not download {url}: {err}") from None


class _OnlineBuilder(ImageBuilder, skip_registration=True):
    """A train/test image classification builder from downloaded arrays.

    Subclasses set `URLS` (key -> URL), `IMAGE_SHAPE`, `CLASS_NAMES` and
    `_read_arrays(paths)` -> `{split: (images, labels)}`.
    """

    URLS: dict[str, str] = {}
    IMAGE_SHAPE: tuple[int, int, int] = (0, 0, 0)
    CLASS_NAMES: tuple[str, ...] = ()

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalInfo(
            builder=self,
            description=f"{self.name}: images parsed with NumPy from {sorted(self.URLS.values())}",
            features=image_features(self.IMAGE_SHAPE, self.CLASS_NAMES),
            supervised_keys=("image", "label"),
            # Keep the files' own order, as torchvision's datasets present it.
            disable_shuffling=True,
        )

    @abc.abstractmethod
    def _read_arrays(self, paths: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Parses the downloaded files, `paths` keyed like `URLS`, into `{split: (images, labels)}`."""

    def _split_generators(self, dl_manager):
        unreachable = None
        try:
            check_reachable(sorted(self.URLS.values()))
        except _DownloadFailed as err:
            unreachable = err
        try:
            if unreachable is None:
                paths = dl_manager.download(self.URLS)
            else:
                # TFDS still gets one try, bounded like the probe: the files may be in its download
                # cache, or a proxy may reach the host. Its retries (module state) and the socket
                # timeout requests falls back on are set for that try alone, one thread at a time.
                with _ONE_TRY:
                    retries, timeout = downloader.MAX_RETRIES, socket.getdefaulttimeout()
                    downloader.MAX_RETRIES = 0
                    socket.setdefaulttimeout(_PROBE_SECONDS)
                    try:
                        paths = dl_manager.download(self.URLS)
                    finally:
                        downloader.MAX_RETRIES = retries
                        socket.setdefaulttimeout(timeout)
        except Exception as err:  # requests, urllib3 and TFDS each raise their own types
            raise unreachable or _DownloadFailed(f"could not download {sorted(self.URLS.values())}: {err}") from None
        arrays = self._read_arrays(paths)
        return {split: self._generate_examples(*arrays[split]) for split in ("train", "test")}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


class Cifar10Builder(_OnlineBuilder):
    """CIFAR-10 from the original binary archive: 50k train + 10k test 32x32 RGB images."""

    name = "fnlearn_cifar10"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw uint8 images in the archive's order."}
    URLS = {"archive": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"}
    IMAGE_SHAPE = (32, 32, 3)
    CLASS_NAMES = CIFAR10_CLASSES

    def _read_arrays(self, paths):
        return read_cifar10_archive(paths["archive"])


class MnistBuilder(_OnlineBuilder):
    """MNIST from the idx files: 60k train + 10k test 28x28 grayscale digits."""

    name = "fnlearn_mnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw uint8 images in the idx files' order."}
    _BASE = "https://storage.googleapis.com/cvdf-datasets/mnist/"
    URLS = {
        "train_images": _BASE + "train-images-idx3-ubyte.gz",
        "train_labels": _BASE + "train-labels-idx1-ubyte.gz",
        "test_images": _BASE + "t10k-images-idx3-ubyte.gz",
        "test_labels": _BASE + "t10k-labels-idx1-ubyte.gz",
    }
    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = tuple(str(d) for d in range(10))

    def _read_arrays(self, paths):
        arrays = {}
        for split in ("train", "test"):
            images = read_idx_gz(paths[f"{split}_images"])
            labels = read_idx_gz(paths[f"{split}_labels"]).astype(np.int32)
            if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
                raise DataError(
                    f"MNIST {split}: images {images.shape} and labels {labels.shape} do not form (N,28,28) and (N,)"
                )
            arrays[split] = (images.astype(np.uint8)[..., None], labels)
        return arrays


ONLINE_BUILDERS = {"cifar10": Cifar10Builder, "mnist": MnistBuilder}


def load_online(name: str, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads CIFAR-10 or MNIST, downloading and preparing it on first use.

    Args:
      name: "cifar10" or "mnist".
      data_dir: TFDS data dir (default: TFDS's, `~/tensorflow_datasets`).

    Returns:
      A `Dataset`: CIFAR-10 images (N, 32, 32, 3), MNIST (N, 28, 28, 1), uint8.

    Raises:
      DataError: with one short message (no TFDS traceback) when the data cannot
        be downloaded, saying to pass `--data PATH`.
    """
    if name not in ONLINE_BUILDERS:
        raise DataError(f"unknown data set {name!r}: known are {', '.join(ONLINE_BUILDERS)}")
    builder = ONLINE_BUILDERS[name](data_dir=default_data_dir(data_dir), file_format="array_record")
    hosts = sorted({urllib.parse.urlsplit(url).hostname for url in builder.URLS.values()})
    try:
        prepare(builder, source=f"{name} downloaded from {', '.join(hosts)}")
    except _DownloadFailed as err:
        # A fresh exception: the chain through TFDS's internals tells the user nothing.
        raise DataError(f"{name}: {err}. {_OFFLINE_HINT}") from None
    except DataError as err:
        raise DataError(f"{name}: {err}") from None
    return read_prepared(builder, source=name)
