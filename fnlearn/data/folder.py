"""Image-folder data sets (`<root>/{train,test}/<class>/*.jpg|png|...`) prepared once as TFDS array_record files.

The folder (or a `.tar.gz` of it) is decoded with PIL once and stored as raw uint8
pixels (CIFAR-10's 60k images are 184 MB), read back later with no decoding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import lzma
import os
import pathlib
import re
import shutil
import sys
import tarfile
import uuid
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fnlearn.data.base import (
    ImageBuilder,
    LocalInfo,
    default_data_dir,
    image_features,
    prepare,
    read_prepared,
)
from fnlearn.data.dataset import DataError, Dataset

log = logging.getLogger(__name__)

# torchvision ImageFolder's (IMG_EXTENSIONS), all of which PIL reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")
# Where extracted archives live, under the TFDS data dir.
EXTRACT_DIR = "fnlearn_extracted"
# Skipped files named in the warning; all of them are in `Dataset.skipped`.
_SHOWN_SKIPPED = 5
_LAYOUT = "expected <root>/{train,test}/<class>/*.{jpg,jpeg,png}"


def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    """Sorted subfolders of `folder`, leaving out hidden ones (.DS_Store-style litter)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_root(folder: pathlib.Path) -> pathlib.Path:
    """The folder holding `train/` and `test/`: `folder` itself or its single subfolder.

    Args:
      folder: an existing directory.

    Returns:
      The data set root.

    Raises:
      DataError: naming the folder when neither it nor a single subfolder has both splits.
    """
    candidates = [folder]
    subfolders = _visible_dirs(folder)
    if len(subfolders) == 1:
        candidates.append(subfolders[0])
    for root in candidates:
        present = [s for s in SPLITS if (root / s).is_dir()]
        if present:
            missing = [s for s in SPLITS if s not in present]
            if missing:
                raise DataError(f"no {missing[0]}/ folder in {root} ({_LAYOUT})")
            return root
    raise DataError(f"no train/ or test/ folder in {folder} ({_LAYOUT})")


def scan_folder(root: pathlib.Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """Lists the images of each split and checks the layout.

    Args:
      root: a folder holding `train/` and `test/`, one subfolder per class in each.

    Returns:
      `(class_names, files)`: sorted class folder names, and per split a sorted
      list of `(image path, label)`.

    Raises:
      DataError: naming the folder that is empty, or the class found in one split only.
    """
    classes = {s: [d.name for d in _visible_dirs(root / s)] for s in SPLITS}
    for split in SPLITS:
        if not classes[split]:
            raise DataError(f"no class folders in {root / split} ({_LAYOUT})")
    only = {s: sorted(set(classes[s]) - set(classes[o])) for s, o in (("train", "test"), ("test", "train"))}
    if only["train"] or only["test"]:
        lone = ", ".join(str(root / s / name) for s in SPLITS for name in only[s])
        raise DataError(f"class folders found in one split only (train and test need the same classes): {lone}")
    class_names = tuple(classes["train"])
    files = {}
    for split in SPLITS:
        files[split] = []
        for label, name in enumerate(class_names):
            folder = root / split / name
            images = sorted(
                entry.path
                for entry in os.scandir(folder)
                # Hidden files are litter, as hidden folders are: macOS's `._0001.jpg` is no image.
                if entry.is_file() and not entry.name.startswith(".")
                and entry.name.lower().endswith(IMAGE_SUFFIXES)
            )
            if not images:
                raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files[split].extend((path, label) for path in images)
    return class_names, files


def _fingerprint(root: pathlib.Path, files: dict[str, list[tuple[str, int]]]) -> str:
    """A hash of the root path and every image's relative path, size and mtime."""
    digest = hashlib.sha256(str(root).encode())
    for split in SPLITS:
        for path, label in files[split]:
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _mode(img: Image.Image) -> str:
    # Grayscale sources (MNIST PNGs, 16-bit scans) keep one channel; all else becomes RGB.
    return "L" if img.mode in ("1", "L") or img.mode.startswith("I;16") else "RGB"


def _pixels(img: Image.Image, mode: str) -> np.ndarray:
    """uint8 pixels of `img` in `mode`; 16-bit levels keep their top 8 bits (`convert` would clip them at 255)."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8), "L")
    return np.asarray(img.convert(mode))


def _probe_shape(files: list[tuple[str, int]]) -> tuple[tuple[int, int, int], str]:
    """Image shape and PIL mode of the data set, from the first image that opens."""
    for path, _ in files:
        try:
            with Image.open(path) as img:
                width, height = img.size
                mode = _mode(img)
        except (OSError, SyntaxError, ValueError):
            continue
        return (height, width, 1 if mode == "L" else 3), mode
    raise DataError(f"no readable image among {len(files)} files, first {files[0][0]}")


def _any_colour(files: dict[str, list[tuple[str, int]]]) -> bool:
    """Whether any image is in colour (PIL reads their headers only)."""
    for split in SPLITS:
        for path, _ in files[split]:
            try:
                with Image.open(path) as img:
                    if _mode(img) == "RGB":
                        return True
            except (OSError, SyntaxError, ValueError):  # corrupt: preparing names or skips it
                continue
    return False


def _is_safe_member(member: tarfile.TarInfo) -> bool:
    """Whether a tar member stays inside the destination and is a plain file or folder."""
    parts = pathlib.PurePosixPath(member.name).parts
    return not (member.name.startswith(("/", "\\")) or ".." in parts) and (member.isfile() or member.isdir())


def extract_archive(archive: pathlib.Path, data_dir: str) -> pathlib.Path:
    """Extracts a `.tar.gz` once into `<data_dir>/fnlearn_extracted/<name>-<hash>` and returns that folder.

    Extraction goes to a temp folder renamed into place at the end, so a killed
    run never leaves a half-extracted folder that a later run would trust. The
    key is a hash of the archive's bytes (one quick read of the file): a
    changed archive is extracted afresh, and a fresh copy of the same archive (a
    new mtime) reuses the extraction and the prepared files.

    Args:
      archive: path of a gzip-compressed tar file.
      data_dir: TFDS data dir.

    Returns:
      The extracted folder.

    Raises:
      DataError: naming the archive if it cannot be read, or the member whose
        path is absolute, climbs out with `..`, or is a link or device.
    """
    try:
        with open(archive, "rb") as f:
            key = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    except OSError as err:
        raise DataError(f"cannot read archive {archive}: {err}") from None
    name = archive.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
    final = pathlib.Path(data_dir) / EXTRACT_DIR / f"{name}-{key}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"extracting {archive} once into {final}", file=sys.stderr)
    tmp = final.with_name(f"{final.name}.incomplete-{uuid.uuid4().hex}")
    try:
        # One streaming pass: checking all members first would decompress twice.
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not _is_safe_member(member):
                    raise DataError(f"unsafe member {member.name!r} in archive {archive}: absolute, '..', or a link")
                tar.extract(member, tmp, filter="data")
            # tar stops at its end-of-archive blocks; reading on to the end makes gzip
            # check its CRC, so a damaged copy fails here instead of decoding wrong pixels.
            while tar.fileobj.read(1 << 20):
                pass
        os.rename(tmp, final)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        # A rename that lost a race to a concurrent extraction leaves a complete `final`.
        if isinstance(err, OSError) and final.is_dir():
            return final
        # tarfile's "could not be opened" lists every compression it tried, a line each: keep the first.
        raise DataError(f"cannot extract archive {archive}: {str(err).splitlines()[0].rstrip(':')}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """One source folder; `name` is derived from its contents, so sources never share prepared files.

    Attributes:
      root: the folder holding `train/` and `test/`.
      class_names: sorted class folder names.
      image_shape: (H, W, C) of every image.
      mode: PIL mode images are converted to, "L" or "RGB".
      skip_corrupt: leave out images that fail to decode instead of failing.
    """

    root: str = ""
    class_names: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = (0, 0, 0)
    mode: str = "RGB"
    skip_corrupt: bool = False


def folder_config(root: pathlib.Path, skip_corrupt: bool, data_dir: str) -> ImageFolderConfig:
    """Scans a data set root and builds its config.

    The images are RGB unless all are grayscale. Where the first is grayscale, every
    image's header is read before the first preparation (named `..._gray` if all are,
    else `..._rgb`; a copy named neither came from before this check); later loads find
    which copy was prepared.

    Args:
      root: a folder holding `train/` and `test/`.
      skip_corrupt: stored in the config and its name, so a strict and a
        skipping preparation of the same folder never share files.
      data_dir: TFDS data dir, where prepared copies are looked for.

    Returns:
      The config, named `<folder>_<hash>[_skip][_gray|_rgb]`.
    """
    class_names, files = scan_folder(root)
    shape, mode = _probe_shape(files["train"])
    slug = re.sub(r"[^a-z0-9]+", "_", root.name.lower()).strip("_")[:40] or "root"
    name = f"{slug}_{_fingerprint(root, files)}" + ("_skip" if skip_corrupt else "")
    config = ImageFolderConfig(
        name=name,
        description=f"Images of {root}",
        root=str(root),
        class_names=class_names,
        image_shape=shape,
        mode=mode,
        skip_corrupt=skip_corrupt,
    )
    if mode == "L":
        gray = dataclasses.replace(config, name=f"{name}_gray")
        rgb = dataclasses.replace(config, name=f"{name}_rgb", image_shape=(*shape[:2], 3), mode="RGB")
        prepared = [c for c in (rgb, gray) if _builder(c, data_dir).data_path.exists()]
        if prepared:
            return prepared[0]
        return rgb if _any_colour(files) else gray
    return config


class ImageFolderBuilder(ImageBuilder):
    """TFDS builder for one image folder; construct with `config=folder_config(...)`."""

    name = "fnlearn_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw uint8 images, folder order."}

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return LocalInfo(
            builder=self,
            description=f"Image classification folder {config.root}",
            features=image_features(config.image_shape, config.class_names),
            supervised_keys=("image", "label"),
            # Keep sorted folder order: reproducible, and training shuffles anyway.
            disable_shuffling=True,
            # The skipped files (relative paths) are written next to the data, so
            # later loads name them too.
            metadata=tfds.core.MetadataDict(skipped=[]),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the images are local
        _, files = scan_folder(pathlib.Path(self.builder_config.root))
        return {split: self._generate_examples(files[split]) for split in SPLITS}

    def _generate_examples(self, files):
        config = self.builder_config
        height, width, _ = config.image_shape
        for path, label in files:
            try:
                with Image.open(path) as img:
                    pixels = _pixels(img, config.mode)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying corrupt/truncated
                if not config.skip_corrupt:
                    raise DataError(f"corrupt or truncated image {path}: {err}") from None
                self.info.metadata["skipped"].append(pathlib.Path(path).relative_to(config.root).as_posix())
                continue
            if pixels.shape[:2] != (height, width):
                raise DataError(
                    f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} but the first train image "
                    f"is {width}x{height}: all images of a data set must have one size"
                )
            yield os.path.relpath(path, config.root), {"image": pixels.reshape(config.image_shape), "label": label}


def _builder(config: ImageFolderConfig, data_dir: str) -> ImageFolderBuilder:
    return ImageFolderBuilder(config=config, data_dir=data_dir, file_format="array_record")


def resolve_source(source: str | os.PathLike, data_dir: str) -> pathlib.Path:
    """The data set root of a folder or `.tar.gz` source, extracting archives once.

    Args:
      source: a folder, or a `.tar.gz`/`.tgz` of one.
      data_dir: TFDS data dir, where archives are extracted.

    Returns:
      The folder holding `train/` and `test/`.
    """
    path = pathlib.Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data source {source} does not exist")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise DataError(f"data source {source} is neither a folder nor a .tar.gz")
        path = extract_archive(path, data_dir)
    return find_root(path)


def load_image_folder(
    source: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, skip_corrupt: bool = False
) -> Dataset:
    """Loads `<root>/{train,test}/<class>/*.{jpg,jpeg,png}` into memory, preparing TFDS files on first use.

    Args:
      source: a folder or `.tar.gz`; `<root>` is the folder itself or its single subfolder.
      data_dir: TFDS data dir for prepared files and extracted archives
        (default: TFDS's, `~/tensorflow_datasets`).
      skip_corrupt: leave out images that fail to decode (listed in
        `Dataset.skipped` and a logged warning) instead of failing on the first.

    Returns:
      A `Dataset`: images (N, H, W, C) uint8 with C=1 for grayscale sources
      and 3 otherwise, labels (N,) int32, class names sorted.

    Raises:
      DataError: naming the file or folder at fault.
    """
    data_dir = default_data_dir(data_dir)
    root = resolve_source(source, data_dir)
    builder = _builder(folder_config(root, skip_corrupt, data_dir), data_dir)
    try:
        prepare(builder, source=str(source))
    except DataError as err:
        # Raised inside TFDS's writer: a fresh exception spares the user its frames.
        raise DataError(str(err)) from None
    dataset = read_prepared(builder, source=str(source))
    if dataset.skipped:
        shown = ", ".join(dataset.skipped[:_SHOWN_SKIPPED])
        more = len(dataset.skipped) - _SHOWN_SKIPPED
        log.warning(
            "left out %d corrupt images of %s (skip_corrupt=True): %s%s",
            len(dataset.skipped), source, shown, f" and {more} more" if more > 0 else "",
        )
    return dataset
