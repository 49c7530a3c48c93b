"""One entry point for every data source: a named online data set or an image folder/archive."""
from __future__ import annotations

import os

from fnlearn.data.base import default_data_dir
from fnlearn.data.dataset import Dataset, DataError
from fnlearn.data.folder import load_image_folder
from fnlearn.data.online import ONLINE_BUILDERS, load_online


def load_dataset(
    name_or_path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, skip_corrupt: bool = False
) -> Dataset:
    """Loads a data set into memory by name ("cifar10", "mnist") or path (folder or `.tar.gz`).

    A bare name always means the online data set, whatever the working
    directory holds; write `./cifar10` for a folder of that name.

    Args:
      name_or_path: "cifar10", "mnist", or a path for `load_image_folder`.
      data_dir: TFDS data dir (default: TFDS's, `~/tensorflow_datasets`).
      skip_corrupt: for folders, leave out images that fail to decode.

    Returns:
      A `Dataset` of uint8 images (N, H, W, C) and int32 labels.

    Raises:
      DataError: when the source is missing, malformed or cannot be downloaded.
    """
    if isinstance(name_or_path, str) and name_or_path in ONLINE_BUILDERS:
        return load_online(name_or_path, data_dir=data_dir)
    data_dir = default_data_dir(data_dir)  # checked first, as every loader does
    if not os.path.exists(os.path.expanduser(name_or_path)):
        raise DataError(f"data source {name_or_path}: no such folder or .tar.gz, nor a data set fnlearn "
                        f"downloads ({', '.join(ONLINE_BUILDERS)})")
    return load_image_folder(name_or_path, data_dir=data_dir, skip_corrupt=skip_corrupt)
