"""The basics experiments run end to end with small arguments and report what they claim."""
import math

import jax
import pytest

from experiments import autograd, dynamic, tensors


def test_autograd_main_returns_checked_values(capsys):
    values = autograd.main(["--x", "3"])
    assert values["quadratic"] == [7.0, 9.0]
    assert values["cubic"] == 32.0  # 3·3² + 5
    assert values["two_inputs"] == [4.0, 27.0]
    assert values["accumulated"] == [3.0, 3.0]
    assert values["custom_relu"] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert values["stop_gradient"] == 0.0
    assert "= 32.0" in capsys.readouterr().out


def test_autograd_raises_when_a_value_is_wrong(monkeypatch):
    real = autograd.autograd_values

    def broken(x_cubic):
        values = real(x_cubic)
        label, computed, _ = values["cubic"]
        values["cubic"] = (label, computed, 0.0)  # an expectation the gradient cannot meet
        return values

    monkeypatch.setattr(autograd, "autograd_values", broken)
    with pytest.raises(ValueError, match="x\\^3"):
        autograd.main([])


def test_tensors_main_small(capsys):
    result = tensors.main(["--size", "64", "--repeats", "1"])
    assert result["arrays"]["(3,1) + (1,4)"] == (3, 4)
    assert result["arrays"]["a @ a.T"] == (2, 2)
    shared = result["shared"]
    # What JAX allows on the CPU: exports share memory, jnp.asarray copies, aligned imports alias.
    assert shared["np.asarray(jax array)"] and shared["np.from_dlpack(jax array)"]
    assert not shared["jnp.asarray(numpy, 64-byte aligned)"]
    assert shared["jax.device_put(numpy, 64-byte aligned)"]
    assert shared["jax.dlpack.from_dlpack(numpy, 64-byte aligned)"]
    assert shared["numpy write shows in jax array"]
    assert set(result["placement"]) == {str(d) for d in jax.devices()}
    for device, result_devices in result["placement"].items():
        assert result_devices == [device]
    rows = result["matmul"]
    # NumPy once, then f32 and bf16 per device (conftest fakes several CPU devices).
    assert len(rows) == 1 + 2 * len(jax.devices())
    assert all(math.isfinite(r["gflops"]) and r["gflops"] > 0 for r in rows)
    bf16 = [r for r in rows if r["dtype"] == "bfloat16->f32"]
    assert all(r["out_dtype"] == "float32" and r["rel_error"] < 2e-2 for r in bf16)
    assert "GFLOP/s" in capsys.readouterr().out


def test_dynamic_main_counts_traces(capsys):
    rows = dynamic.main(["--depths", "1", "2", "--n-steps", "2", "3"])
    traces = {name: row["traces"] for name, row in rows.items()}
    assert traces == {
        "DynamicNet, Python bool": 2,        # one per flag value
        "DynamicNet, lax.cond": 1,
        "VariableDepthMLP, Python int": 2,   # one per depth
        "VariableDepthMLP, fori_loop": 1,
        "RecurrentNet, lax.scan": 2,         # n_steps sets the output shape: one per value either way
        "RecurrentNet, Python loop": 2,
    }
    assert all(row["programs"] == row["traces"] for row in rows.values())
    assert rows["RecurrentNet, lax.scan"]["tanh_ops"] == 1   # one cell, looped
    assert rows["RecurrentNet, Python loop"]["tanh_ops"] == 3  # unrolled for n_steps = 3
    assert "fori_loop" in capsys.readouterr().out
