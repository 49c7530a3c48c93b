"""Test setup: the CPU backend, several fake CPU devices, programs compiled at LLVM -O1, a TFDS
data dir of the session's own, and an image-folder writer.

The suite is compile-bound, and on small programs XLA:CPU spends most of its compile time
in LLVM's -O2 (docs/performance.md, "The test suite"). What runs as a user runs it (the
smoke run on the shared CIFAR-10) goes through `user_environ`: its own process, the user's
flags. Not -O0: there the accumulating recipe step gave NaN where -O1 and -O2 train.

Strict dtype promotion is not turned on: optax's own Adam (`decay ** count`, float by
int32) fails under it, so dtype tests check dtypes explicitly instead.
"""
import os
import shutil
import tempfile

# Must be set before JAX starts: fake devices make multi-device bugs show on CPU. A user's
# own optimization level wins.
USER_ENVIRON = dict(os.environ)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_level = "" if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "") else " --xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + _level).strip()

# Tests that load without a data dir (the experiments' defaults) prepare here, not in
# the user's ~/tensorflow_datasets or $TFDS_DATA_DIR. TFDS reads the variable at import
# (`constants.DATA_DIR`) and on each `get_default_data_dir()`, so set it before any import.
TFDS_DATA_DIR = tempfile.mkdtemp(prefix="fnlearn-tests-tfds-")
os.environ["TFDS_DATA_DIR"] = TFDS_DATA_DIR

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TFDS_DATA_DIR, ignore_errors=True)


COLORS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]])


def _write_tree(root, per_class=(24, 8), size=32, channels=3, classes=4, suffix=".jpg"):
    """root/{train,test}/<class>/N.jpg: each class a noisy solid colour, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = COLORS[c][:channels] if channels == 3 else np.array([60 * c + 30])
                pixels = np.clip(base + rng.normal(0, 40, (size, size, channels)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(root / split / f"class{c}" / f"{i}{suffix}")
    return root


@pytest.fixture(scope="session")
def write_tree():
    """`write_tree(root, per_class=(24, 8), size=32, channels=3, classes=4, suffix=".jpg")`: an image
    folder of learnable classes for the recipe and benchmark tests."""
    return _write_tree


@pytest.fixture
def user_environ():
    """The environment pytest started in (the user's XLA_FLAGS), on the suite's backend and data
    dir, for commands that must run as a user runs them."""
    return {**USER_ENVIRON, "JAX_PLATFORMS": os.environ["JAX_PLATFORMS"], "TFDS_DATA_DIR": TFDS_DATA_DIR}


@pytest.fixture
def torch():
    """PyTorch, for parity tests. Skipped where absent, unless FNLEARN_REQUIRE_TORCH=1 (CI)."""
    if os.environ.get("FNLEARN_REQUIRE_TORCH") == "1":
        import torch as torch_module
    else:
        torch_module = pytest.importorskip("torch")
    torch_module.manual_seed(0)
    return torch_module
