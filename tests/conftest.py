"""Test setup: the CPU backend and several fake CPU devices.

Strict dtype promotion is not turned on: optax's own Adam (`decay ** count`, float by
int32) fails under it, so dtype tests check dtypes explicitly instead.
"""
import os

# Must be set before JAX starts: fake devices make multi-device bugs show on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import pytest  # noqa: E402


@pytest.fixture
def torch():
    """PyTorch, for parity tests. Skipped where absent, unless FNLEARN_REQUIRE_TORCH=1 (CI)."""
    if os.environ.get("FNLEARN_REQUIRE_TORCH") == "1":
        import torch as torch_module
    else:
        torch_module = pytest.importorskip("torch")
    torch_module.manual_seed(0)
    return torch_module
