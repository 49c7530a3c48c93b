"""What every loader returns, and its error type: plain Python, so importing them needs no TFDS."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


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
      skipped: corrupt images left out when preparing with `skip_corrupt=True`,
        as paths relative to the data set root (`train/cat/0003.jpg`); empty otherwise.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[str, ...] = ()

    def rgb(self) -> Dataset:
        """This data set with grayscale images repeated into three channels, as torchvision's
        `ImageFolder` loads them, for models and normalisations made for colour; unchanged if RGB."""
        if self.train_images.shape[-1] != 1:
            return self
        return self._replace(train_images=np.repeat(self.train_images, 3, axis=-1),
                             test_images=np.repeat(self.test_images, 3, axis=-1))
