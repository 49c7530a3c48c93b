"""Test setup: the CPU backend, several fake CPU devices, and a TFDS data dir of the session's own.

Strict dtype promotion is not turned on: optax's own Adam (`decay ** count`, float by
int32) fails under it, so dtype tests check dtypes explicitly instead.
"""
import os
import shutil
import tempfile

# Must be set before JAX starts: fake devices make multi-device bugs show on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# Tests that load without a data dir (the experiments' defaults) prepare here, not in
# the user's ~/tensorflow_datasets or $TFDS_DATA_DIR. TFDS reads the variable at import
# (`constants.DATA_DIR`) and on each `get_default_data_dir()`, so set it before any import.
TFDS_DATA_DIR = tempfile.mkdtemp(prefix="fnlearn-tests-tfds-")
os.environ["TFDS_DATA_DIR"] = TFDS_DATA_DIR

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TFDS_DATA_DIR, ignore_errors=True)


@pytest.fixture
def torch():
    """PyTorch, for parity tests. Skipped where absent, unless FNLEARN_REQUIRE_TORCH=1 (CI)."""
    if os.environ.get("FNLEARN_REQUIRE_TORCH") == "1":
        import torch as torch_module
    else:
        torch_module = pytest.importorskip("torch")
    torch_module.manual_seed(0)
    return torch_module
