"""The shared training-loop pieces: epoch order, steps in one scan, batched evaluation, history, divergence."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlearn.train import History, TrainingDiverged, batched, chunks, epoch_order, scan_steps
from fnlearn.train.loop import first_nonfinite_step


def test_epoch_order_is_a_fixed_permutation_per_epoch_without_the_last_partial_batch():
    key = jax.random.key(0)
    order = np.asarray(epoch_order(key, 3, 10, 4))
    assert order.shape == (2, 4) and len(set(order.ravel())) == 8 and order.max() < 10
    np.testing.assert_array_equal(order, epoch_order(key, 3, 10, 4))  # the same epoch, the same order
    assert not np.array_equal(order, epoch_order(key, 4, 10, 4))  # another epoch, another order
    np.testing.assert_array_equal(epoch_order(key, 3, 10, 4, shuffle=False), [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_scan_steps_runs_the_steps_of_a_python_loop():
    def step(total, x):
        return total + x, total * x

    xs = jnp.arange(1.0, 6.0)
    total, metrics = jax.jit(scan_steps(step))(jnp.float32(0), xs)
    expected, carry = [], 0.0
    for x in range(1, 6):
        expected.append(carry * x)
        carry += x
    assert float(total) == carry and metrics.tolist() == expected


def test_chunks_cover_the_steps_in_order():
    assert [list(c) for c in chunks(10, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [list(c) for c in chunks(4, 4)] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("n", [7, 8, 1])
def test_batched_gives_what_one_call_gives_and_cuts_the_padding(n):
    x = jax.random.normal(jax.random.key(1), (n, 3))
    w = jnp.arange(6.0).reshape(3, 2)
    calls = []

    def fn(xb):
        calls.append(xb.shape)  # traced once, at the batch shape
        return {"y": xb @ w, "norm": jnp.linalg.norm(xb, axis=1)}

    out = jax.jit(lambda x: batched(fn, x, 4))(x)
    assert calls == [(min(n, 4), 3)]  # a batch past N would only be padding
    np.testing.assert_allclose(out["y"], x @ w, rtol=1e-6)
    np.testing.assert_allclose(out["norm"], jnp.linalg.norm(x, axis=1), rtol=1e-6)


def test_history_holds_one_list_per_name_and_goes_to_json():
    history = History()
    history.append({"train_loss": np.float32(2.5), "epoch_seconds": 1})
    history.append({"train_loss": 1.5, "epoch_seconds": 1.5})
    assert history.epochs == 2 and history["train_loss"] == [2.5, 1.5]
    assert json.loads(json.dumps(history)) == {"train_loss": [2.5, 1.5], "epoch_seconds": [1.0, 1.5]}


def test_training_diverged_names_the_step_the_leaf_and_the_checkpoint():
    error = TrainingDiverged(12, "params/head/kernel", checkpoint="/runs/x/3", epoch=4)
    assert str(error).startswith("training diverged: non-finite value at step 12 (epoch 4): first in "
                                 "params/head/kernel; the last good checkpoint is /runs/x/3")
    assert "no checkpoint was written" in str(TrainingDiverged(0))
    assert first_nonfinite_step([1.0, 2.0, np.inf, np.nan]) == 2 and first_nonfinite_step([1.0]) is None
