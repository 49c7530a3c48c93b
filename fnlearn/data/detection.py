"""The canvas detection set (`data.canvas`) prepared once as TFDS array_record files, like the
classification sets: train canvases from the source's train split, test canvases from its test split."""
from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import tensorflow_datasets as tfds

from fnlearn.data.base import ImageBuilder, LocalInfo, default_data_dir, prepare
from fnlearn.data.canvas import Canvases, make_canvases
from fnlearn.data.dataset import DataError, Dataset

_CHUNK = 1000  # canvases made and read at a time


@dataclasses.dataclass(eq=False)
class CanvasConfig(tfds.core.BuilderConfig):
    """What a canvas set is made from; `name` hashes all of it with the source's pixels."""
    counts: tuple[int, int] = (0, 0)  # train, test canvases
    seed: int = 0
    size: int = 128
    max_objects: int = 4
    channels: int = 3
    class_names: tuple[str, ...] = ()


class CanvasBuilder(ImageBuilder):
    """TFDS builder of a canvas set; construct with `config=` and set `source` (a `Dataset`) before preparing."""

    name = "fnlearn_canvases"
    # Prepared sets are found by name and version: a change to how `make_canvases` draws (its
    # defaults, its rules) must bump the version.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "128x128 canvases of 1-4 pasted objects, exact boxes."}
    source: Dataset | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        k = c.max_objects
        return LocalInfo(builder=self, description="Objects pasted on canvases (fnlearn.data.canvas)",
                         features=tfds.features.FeaturesDict({
                             "image": tfds.features.Tensor(shape=(c.size, c.size, c.channels), dtype=np.uint8,
                                                           encoding=tfds.features.Encoding.BYTES),
                             "boxes": tfds.features.Tensor(shape=(k, 4), dtype=np.float32),
                             "classes": tfds.features.Tensor(shape=(k,), dtype=np.int32),
                             "count": tfds.features.Tensor(shape=(), dtype=np.int32),
                             "sources": tfds.features.Tensor(shape=(k,), dtype=np.int32)}),
                         disable_shuffling=True, metadata=tfds.core.MetadataDict(class_names=list(c.class_names)))

    def _split_generators(self, dl_manager):
        del dl_manager
        c, source = self.builder_config, self.source
        return {"train": self._generate_examples(source.train_images, source.train_labels, c.counts[0], c.seed),
                "test": self._generate_examples(source.test_images, source.test_labels, c.counts[1], c.seed + 1)}

    def _generate_examples(self, images, labels, count, seed):
        c = self.builder_config
        for start in range(0, count, _CHUNK):
            # Canvas i depends on (seed, i) alone: make a chunk as the slice of the whole set.
            part = make_canvases(images, labels, min(_CHUNK, count - start), seed, first=start, size=c.size,
                                 max_objects=c.max_objects)
            for i in range(len(part.images)):
                yield start + i, {"image": part.images[i], "boxes": part.boxes[i], "classes": part.classes[i],
                                  "count": part.counts[i], "sources": part.sources[i]}


def _fingerprint(dataset, counts, seed, size, max_objects):
    digest = hashlib.sha256(repr((counts, seed, size, max_objects, dataset.class_names)).encode())
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]


def _read(source, count, config):
    k = config.max_objects
    out = Canvases(np.empty((count, config.size, config.size, config.channels), np.uint8),
                   np.empty((count, k, 4), np.float32), np.empty((count, k), np.int32), np.empty(count, np.int32),
                   np.empty((count, k), np.int32))
    for start in range(0, count, _CHUNK):
        examples = source.__getitems__(range(start, min(start + _CHUNK, count)))
        for field, key in (("images", "image"), ("boxes", "boxes"), ("classes", "classes"), ("counts", "count"),
                           ("sources", "sources")):
            getattr(out, field)[start:start + len(examples)] = np.stack([ex[key] for ex in examples])
    return out


def load_canvases(dataset, *, train=20000, test=2000, seed=0, size=128, max_objects=4, data_dir=None):
    """`(train Canvases, test Canvases)` made from the classification `dataset`, prepared once as
    array_record files under `data_dir` (later calls with the same arguments read them back).

    Raises:
      DataError: the source's images are not square or larger than half the canvas, or a
        split has fewer images than a canvas draws (a background and `max_objects`).
    """
    height, width = dataset.train_images.shape[1:3]
    if height != width or 2 * height > size:
        raise DataError(f"canvases of {size}x{size} need square images of at most {size // 2} pixels; "
                        f"{dataset.source} has {width}x{height}")
    for split, images in (("train", dataset.train_images), ("test", dataset.test_images)):
        if len(images) < 1 + max_objects:
            raise DataError(f"canvases of up to {max_objects} objects draw {1 + max_objects} distinct images; "
                            f"the {split} split of {dataset.source} has {len(images)}")
    slug = re.sub(r"[^a-z0-9]+", "_", str(dataset.source).lower()).strip("_")[-40:] or "source"
    config = CanvasConfig(name=f"{slug}_{_fingerprint(dataset, (train, test), seed, size, max_objects)}",
                          counts=(train, test), seed=seed, size=size, max_objects=max_objects,
                          channels=dataset.train_images.shape[-1], class_names=tuple(dataset.class_names))
    builder = CanvasBuilder(config=config, data_dir=default_data_dir(data_dir), file_format="array_record")
    builder.source = dataset
    prepare(builder, source=f"canvases from {dataset.source}")
    sources = builder.as_data_source()
    return _read(sources["train"], train, config), _read(sources["test"], test, config)
