"""Data: TFDS builders without TensorFlow, whole data sets in memory, on-device augmentation.

Augmentation, subsets and the `Dataset` type import no TFDS; the loaders and builders
import it when first used (`fnlearn.data.load_dataset` and the names in `_LAZY`), so
`from fnlearn.data import augment` stays a pure-JAX import.
"""
import importlib

from fnlearn.data.augment import CIFAR10_MEAN
from fnlearn.data.augment import CIFAR10_STD
from fnlearn.data.augment import MNIST_MEAN
from fnlearn.data.augment import MNIST_STD
from fnlearn.data.augment import alternating_flip
from fnlearn.data.augment import flip
from fnlearn.data.augment import normalize
from fnlearn.data.augment import random_crop
from fnlearn.data.augment import random_flip
from fnlearn.data.augment import random_translate
from fnlearn.data.augment import shift
from fnlearn.data.augment import tta_logits
from fnlearn.data.augment import tta_views
from fnlearn.data.dataset import DataError
from fnlearn.data.dataset import Dataset
from fnlearn.data.subset import stratified_subset

# Name -> the module that defines it; these modules import TFDS.
_LAZY = {
    "load_dataset": "fnlearn.data.datasets",
    "ImageFolderBuilder": "fnlearn.data.folder",
    "load_image_folder": "fnlearn.data.folder",
    "Cifar10Builder": "fnlearn.data.online",
    "MnistBuilder": "fnlearn.data.online",
    "load_online": "fnlearn.data.online",
    "load_canvases": "fnlearn.data.detection",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fnlearn.data' has no attribute {name!r}")
