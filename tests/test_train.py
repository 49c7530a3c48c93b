"""The training core: optimizers, fit in both modes, the finite check."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.workloads import airbench_lr
from experiments import cli
from fnlearn.checkpoint import load_variables
from fnlearn.models import DynamicNet, SimpleNet
from fnlearn.report import TensorBoardWriter, read_events
from fnlearn.tools.tensorboard import StepSummaries
from fnlearn.train import (TrainingDiverged, TrainState, cross_entropy, decay_mask, fit, make_optimizer,
                           make_schedule, make_train_step)
from fnlearn.train.steps import first_nonfinite


def blobs(key, n=256, classes=4, features=16):
    """Linearly separable classes: one Gaussian blob per class."""
    k1, k2 = jax.random.split(key)
    centers = 3.0 * jax.random.normal(k1, (classes, features))
    labels = jnp.arange(n) % classes
    return centers[labels] + jax.random.normal(k2, (n, features)), labels


def new_state(model, x, tx, seed=0):
    return TrainState.create(apply_fn=model.apply, variables=model.init(jax.random.key(seed), x), tx=tx)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_fit_lowers_loss_with_every_optimizer(name):
    x, y = blobs(jax.random.key(0))
    lr = 0.01 if name.startswith("adam") else 0.05
    state = new_state(SimpleNet(), x, make_optimizer(name, lr, weight_decay=1e-4))
    _, history = fit(state, (x, y), epochs=5, batch_size=32, key=jax.random.key(1), progress=False)
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["train_accuracy"][-1] > 0.9
    assert len(history["train_grad_norm"]) == 5


@pytest.mark.parametrize("compiled", [False, True])
def test_fit_leaves_the_callers_state_and_variables_usable(compiled):
    x, y = blobs(jax.random.key(0), n=64)
    variables = SimpleNet().init(jax.random.key(0), x)
    state = TrainState.create(apply_fn=SimpleNet().apply, variables=variables, tx=make_optimizer("sgd", 0.05))
    trained, _ = fit(state, (x, y), epochs=1, batch_size=32, key=jax.random.key(1), compiled=compiled, progress=False)
    assert int(state.step) == 0 and int(trained.step) == 2  # the steps donate a copy, not the caller's arrays
    SimpleNet().apply(variables, x)  # as a PyTorch user would reuse the initial weights


def test_compiled_run_matches_step_loop():
    x, y = blobs(jax.random.key(0))
    tx = make_optimizer("momentum", 0.05)
    a, ha = fit(new_state(SimpleNet(), x, tx), (x, y), epochs=3, batch_size=64, key=jax.random.key(3),
                eval_data=(x[:100], y[:100]), progress=False)
    b, hb = fit(new_state(SimpleNet(), x, tx), (x, y), epochs=3, batch_size=64, key=jax.random.key(3),
                eval_data=(x[:100], y[:100]), compiled=True)
    for pa, pb in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(ha["eval_accuracy"], hb["eval_accuracy"])
    assert int(b.step) == 3 * (256 // 64)
    assert hb["compile_seconds"] > 0


def test_clipping_bounds_the_update():
    x, y = blobs(jax.random.key(0), n=64)
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 1.0))
    step = jax.jit(make_train_step(clip_norm=1e-3))
    after, metrics = step(state, (x, y))
    moved = jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in
                         zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params))))
    assert float(metrics["grad_norm"]) > 1e-2  # reported before clipping
    np.testing.assert_allclose(float(moved), 1e-3, rtol=1e-3)  # lr 1 × clipped norm


def test_grad_norm_metric_is_optional_and_clipping_still_applies():
    x, y = blobs(jax.random.key(0), n=64)
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 1.0))
    with_norm, metrics = jax.jit(make_train_step(clip_norm=1e-3))(state, (x, y))
    without, bare = jax.jit(make_train_step(clip_norm=1e-3, grad_norm=False))(state, (x, y))
    assert "grad_norm" in metrics and "grad_norm" not in bare
    assert set(bare) == {"loss", "accuracy"}
    for a, b in zip(jax.tree.leaves(with_norm.params), jax.tree.leaves(without.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # the same clipped update


@pytest.mark.parametrize("compiled", [False, True])
def test_nonfinite_check_names_step_and_leaf(compiled):
    x, y = blobs(jax.random.key(0), n=64)
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 0.01))
    # A NaN in the second layer's kernel makes the loss NaN, so every gradient is NaN
    # and the first leaf in flatten order (biases sort before kernels) is named.
    params = state.params
    poisoned = params["Linear_1"]["kernel"].at[0, 0].set(jnp.nan)
    state = state.replace(params={**params, "Linear_1": {**params["Linear_1"], "kernel": poisoned}})
    with pytest.raises(TrainingDiverged, match=r"step 0: first in params/Linear_0/bias") as err:
        fit(state, (x, y), epochs=2, batch_size=32, key=jax.random.key(1), check_finite=True,
            compiled=compiled, progress=False)
    # The state handed back is the one before the bad step.
    assert err.value.step == 0
    assert int(err.value.state.step) == 0


def test_a_nan_gradient_is_named_under_clipping_too():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = self.param("z", nn.initializers.zeros, (1,))
            return nn.Dense(3)(x) + 0.0 * jnp.sqrt(z)  # a finite forward; z's gradient is 0 * Inf = NaN

    x, y = blobs(jax.random.key(0), n=32)
    for clip_norm in (None, 1.0):  # clipped, every gradient is NaN: the norm is
        state = new_state(Net(), x, make_optimizer("sgd", 0.01))
        with pytest.raises(TrainingDiverged, match=r"step 0: first in params/z\b"):
            fit(state, (x, y), epochs=1, batch_size=32, key=jax.random.key(1), check_finite=True,
                clip_norm=clip_norm, progress=False)


def test_first_nonfinite_names_only_the_bad_leaf():
    finite = {"Dense_0": {"bias": True, "kernel": True}, "Dense_1": {"bias": True, "kernel": False}}
    assert first_nonfinite(finite) == "params/Dense_1/kernel"
    assert first_nonfinite(jax.tree.map(lambda _: True, finite)) is None


def test_nonfinite_check_fires_mid_run():
    x, y = blobs(jax.random.key(0), n=64)
    x_bad = x.at[40, 0].set(jnp.inf)  # in the second batch of 32 (no shuffling)
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 0.01))
    with pytest.raises(TrainingDiverged) as err:
        fit(state, (x_bad, y), epochs=1, batch_size=32, key=jax.random.key(1), shuffle=False,
            check_finite=True, progress=False)
    assert err.value.step == 1
    assert int(err.value.state.step) == 1  # the first (finite) step was kept
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(err.value.state.params))


def test_fit_rejects_batch_larger_than_data():
    x, y = blobs(jax.random.key(0), n=16)
    with pytest.raises(ValueError, match="batch_size=32"):
        fit(new_state(SimpleNet(), x, make_optimizer("sgd", 0.1)), (x, y), epochs=1, batch_size=32,
            key=jax.random.key(0), progress=False)


def test_fit_refuses_x_and_y_of_different_lengths():
    x, y = blobs(jax.random.key(0), n=64)
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 0.1))
    with pytest.raises(ValueError, match="^train_data: x holds 64 examples and y 40"):
        fit(state, (x, y[:40]), epochs=1, batch_size=16, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="^eval_data: x holds 64 examples and y 8"):
        fit(state, (x, y), epochs=1, batch_size=16, key=jax.random.key(0), eval_data=(x, y[:8]), progress=False)


@pytest.mark.parametrize("compiled", [False, True])
def test_fit_called_again_goes_on_with_the_next_epochs(compiled):
    x, y = blobs(jax.random.key(0), n=64)
    tx = make_optimizer("momentum", 0.05)
    run = dict(batch_size=16, key=jax.random.key(1), compiled=compiled, progress=False)
    once, _ = fit(new_state(SimpleNet(), x, tx), (x, y), epochs=2, **run)
    half, _ = fit(new_state(SimpleNet(), x, tx), (x, y), epochs=1, **run)
    twice, _ = fit(half, (x, y), epochs=1, **run)
    for a, b in zip(jax.tree.leaves(once.params), jax.tree.leaves(twice.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    empty, history = fit(twice, (x, y), epochs=0, **run)
    assert int(empty.step) == 8 and not history.get("train_loss")


def test_fit_evaluates_a_loss_with_terms():
    x, y = blobs(jax.random.key(0), n=64)

    def loss_with_terms(out, y):
        loss = cross_entropy(out, y)
        return loss, {"half": loss / 2}

    _, history = fit(new_state(SimpleNet(), x, make_optimizer("sgd", 0.1)), (x, y), epochs=1, batch_size=32,
                     key=jax.random.key(0), loss_fn=loss_with_terms, eval_data=(x, y), progress=False)
    np.testing.assert_allclose(history["eval_half"], np.asarray(history["eval_loss"]) / 2, rtol=1e-6)


def test_weight_decay_masks_biases():
    params = DynamicNet().init(jax.random.key(0), jnp.ones((1, 10)))["params"]
    mask = decay_mask(params)
    assert mask["hidden"]["kernel"] and not mask["hidden"]["bias"]


@pytest.mark.parametrize("total_steps,peak_at,end", [(476, 0.23, 0.07), (200, 0.0, 0.0), (100, 0.2, 0.0)])
def test_triangular_schedule_is_airbench_get_lr_at_every_step(total_steps, peak_at, end):
    # airbench94's default run (476 steps), airbench94_muon's decay from the start, the ResNet preset's.
    schedule = make_schedule("triangular", 2.0, total_steps, peak_at=peak_at, end=end)
    steps = np.arange(total_steps + 1)
    expected = [2.0 * airbench_lr(s, total_steps, peak_at, end) for s in steps]
    np.testing.assert_allclose(jax.vmap(schedule)(steps), expected, rtol=1e-6, atol=1e-6)
    rise = int(peak_at * total_steps)
    assert float(schedule(0)) == pytest.approx(0.4 if rise else 2.0)
    assert float(schedule(rise)) == pytest.approx(2.0)  # the peak
    assert float(schedule(total_steps)) == pytest.approx(2.0 * end, abs=1e-6)
    assert float(schedule(total_steps + 10)) == pytest.approx(2.0 * end, abs=1e-6)  # held past the end


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        make_optimizer("adamx", 0.1)
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("cosine", 0.1)


def test_cross_entropy_label_smoothing_matches_definition():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([0])
    logp = jax.nn.log_softmax(logits)[0]
    target = 0.9 * jnp.array([1.0, 0, 0]) + 0.1 / 3  # PyTorch's smoothing over all classes
    assert float(cross_entropy(logits, labels, 0.1)) == pytest.approx(float(-(target * logp).sum()), rel=1e-6)


def test_weight_decay_masks_stacked_biases():
    from fnlearn.models import VariableDepthMLP
    params = VariableDepthMLP(max_depth=3).init(jax.random.key(0), jnp.ones((1, 4)), 2)["params"]
    mask = decay_mask(params)
    assert mask["hidden_kernels"] and not mask["hidden_biases"]  # (3, 32) biases: rank 2, still no decay


@pytest.mark.parametrize("compiled", [False, True])
def test_detect_anomaly_names_the_layer_where_the_first_inf_appeared(compiled, tmp_path):
    x, y = blobs(jax.random.key(0), n=64)
    x_bad = x.at[40, 0].set(jnp.inf)  # in the second batch of 32: the first layer's output for it
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 0.01))
    with pytest.raises(TrainingDiverged, match=r"step 1: first NaN/Inf: the output of Linear_0 \(forward\), "
                                               r"128 of 4096 elements") as err:  # one example's 128 units
        fit(state, (x_bad, y), epochs=1, batch_size=32, key=jax.random.key(1), shuffle=False,
            detect_anomaly=True, compiled=compiled, progress=False)
    assert (err.value.anomaly.where, err.value.anomaly.name) == ("forward", "Linear_0")
    assert int(err.value.state.step) == 1  # the last finite state
    # What an experiment prints: one line, after saving the last finite weights where it says.
    message = cli.diverged_message(err.value, tmp_path, {"model": "simple_net"})
    assert message.startswith("error: training diverged") and "\n" not in message
    assert f"{tmp_path / 'last_finite'}" in message
    variables, meta = load_variables(tmp_path / "last_finite")
    assert meta == {"model": "simple_net", "step": 1}
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(err.value.state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_detect_anomaly_replays_a_loss_with_terms():
    x, y = blobs(jax.random.key(0), n=64)
    x_bad = x.at[40, 0].set(jnp.inf)

    def loss_with_terms(out, y):
        loss = cross_entropy(out, y)
        return loss, {"half": loss / 2}

    with pytest.raises(TrainingDiverged, match=r"the output of Linear_0 \(forward\)"):
        fit(new_state(SimpleNet(), x, make_optimizer("sgd", 0.01)), (x_bad, y), epochs=1, batch_size=32,
            key=jax.random.key(1), shuffle=False, loss_fn=loss_with_terms, detect_anomaly=True, progress=False)


def test_tensorboard_every_n_steps_writes_the_steps_scalars_and_histograms(tmp_path):
    x, y = blobs(jax.random.key(0), n=64)
    state = new_state(SimpleNet(), x, make_optimizer("sgd", 0.1))
    summaries = StepSummaries(TensorBoardWriter(tmp_path), every=4, learning_rates={"lr": lambda step: 0.1})
    final, _ = fit(state, (x, y), epochs=2, batch_size=16, key=jax.random.key(1), summaries=summaries,
                   progress=False)  # 4 steps an epoch: steps 4 and 8 are written
    events = read_events(tmp_path)
    steps = {tag: [s for s, t, _ in events if t == tag] for _, tag, _ in events}
    for tag in ("step/loss", "step/accuracy", "step/grad_norm", "step/lr", "weights/Linear_0/kernel",
                "gradients/Linear_1/bias"):
        assert steps[tag] == [4, 8], tag
    at_8 = {tag: value for s, tag, value in events if s == 8}
    # The weights' histogram after step 8 is the final weights'; its buckets split [min, max] in 30.
    w = np.asarray(final.params["Linear_0"]["kernel"], np.float64).ravel()
    h = at_8["weights/Linear_0/kernel"]
    assert (h.num, h.min, h.max) == (w.size, np.float32(w.min()), np.float32(w.max()))
    np.testing.assert_allclose([h.sum, h.sum_squares], [w.sum(), (w * w).sum()], rtol=1e-4)
    expected, _ = np.histogram(w, bins=30, range=(w.min(), w.max()))
    assert np.abs(np.array(h.bucket) - expected).max() <= 1  # float32 rounding may move an edge value
    # The gradients' histograms hold the same gradients as the step's norm.
    grads = [v for tag, v in at_8.items() if tag.startswith("gradients/")]
    np.testing.assert_allclose(np.sqrt(sum(g.sum_squares for g in grads)), at_8["step/grad_norm"], rtol=1e-4)
    g = at_8["gradients/Linear_1/kernel"]
    np.testing.assert_allclose([at_8["grad_norm/Linear_1/kernel"], at_8["grad_mean/Linear_1/kernel"],
                                at_8["grad_max_abs/Linear_1/kernel"]],
                               [np.sqrt(g.sum_squares), g.sum / g.num, max(-g.min, g.max)], rtol=1e-5)
