"""Precision policies and float16's dynamic loss scale (GradScaler's rule)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnlearn.data import load_dataset
from fnlearn.recipes.cifar import CifarConfig, train_and_evaluate
from fnlearn.train import POLICIES, LossScale, TrainState, make_optimizer, make_train_step


class HalfMLP(nn.Module):
    """A float16 MLP with float32 params, as the fp16 policy runs a model."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, dtype=jnp.float16)(x))
        return nn.Dense(3, dtype=jnp.float16)(x)


def _state(loss_scale):
    model = HalfMLP()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=make_optimizer("sgd", 0.1),
                             loss_scale=loss_scale)


def schedule_counts(opt_state):
    """The counts of the schedules in an optimizer state: the step their learning rate is at."""
    is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)  # noqa: E731
    return [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]


def test_the_policies_compute_in_their_dtype_and_only_fp16_scales_the_loss():
    assert {name: (p.compute_dtype, p.loss_scale) for name, p in POLICIES.items()} == {
        "fp32": (jnp.float32, False), "bf16": (jnp.bfloat16, False), "fp16": (jnp.float16, True)}


def test_an_overflow_skips_the_step_halves_the_scale_and_it_grows_back():
    step = jax.jit(make_train_step(check_finite=True))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    y = jnp.arange(8) % 3
    start = _state(LossScale.create(scale=1024.0, growth_interval=2))
    # 1e5 overflows float16 (largest finite: 65504), so the forward pass, and the gradients, are Inf/NaN.
    skipped, metrics = step(start, (x.at[0, 0].set(1e5), y))
    assert not bool(jnp.all(jnp.isfinite(metrics["loss"]))) and bool(metrics["skipped"])
    assert bool(metrics["all_finite"])  # an overflow the scale absorbs is no divergence
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(start.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert schedule_counts(skipped.opt_state) == [1]  # the rest of the optimizer state is SGD's nothing
    assert int(skipped.step) == 1 and float(skipped.loss_scale.scale) == 512.0
    once, metrics = step(skipped, (x, y))
    assert not bool(metrics["skipped"]) and float(once.loss_scale.scale) == 512.0
    assert int(once.loss_scale.good_steps) == 1
    twice, _ = step(once, (x, y))
    assert float(twice.loss_scale.scale) == 1024.0 and int(twice.loss_scale.good_steps) == 0
    # A finite step's update is the unscaled one, to float16's rounding of the backward pass.
    plain, _ = step(_state(None), (x, y))
    for a, b in zip(jax.tree.leaves(once.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_the_scale_does_not_grow_past_float32s_range():
    top = LossScale.create(scale=2.0**127, growth_interval=1)
    kept = top.adjust(jnp.array(True))  # 2^128 is Inf in float32
    assert float(kept.scale) == 2.0**127 and int(kept.good_steps) == 0  # as GradScaler: kept, the count reset
    assert float(LossScale.create(scale=2.0**126, growth_interval=1).adjust(jnp.array(True)).scale) == 2.0**127


def test_a_skipped_step_moves_the_learning_rate_schedule_on():
    # PyTorch calls scheduler.step() whether scaler.step() skipped the update or not.
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    start = _state(LossScale.create(scale=1024.0)).replace(tx=optax.sgd(schedule, momentum=0.9))
    start = start.replace(opt_state=start.tx.init(start.params))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    y = jnp.arange(8) % 3
    skipped, metrics = jax.jit(make_train_step())(start, (x.at[0, 0].set(1e5), y))
    assert bool(metrics["skipped"])
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(start.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert schedule_counts(skipped.opt_state) == [1]
    trace = lambda state: state.opt_state[0].trace  # noqa: E731  (momentum: kept, as GradScaler keeps it)
    for a, b in zip(jax.tree.leaves(trace(skipped)), jax.tree.leaves(trace(start)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_overflow_at_the_scale_floor_of_1_is_a_divergence():
    step = jax.jit(make_train_step(check_finite=True))
    x, y = jax.random.normal(jax.random.key(1), (8, 4)).at[0, 0].set(1e5), jnp.arange(8) % 3
    at_two, metrics = step(_state(LossScale.create(scale=2.0)), (x, y))
    assert bool(metrics["all_finite"]) and float(at_two.loss_scale.scale) == 1.0
    at_one, metrics = step(at_two, (x, y))
    assert not bool(metrics["all_finite"]) and float(at_one.loss_scale.scale) == 1.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, write_tree):
    root = tmp_path_factory.mktemp("tree")
    return load_dataset(write_tree(root / "src"), data_dir=root / "tfds")


def test_a_resumed_fp16_run_continues_with_the_saved_scale(dataset, tmp_path):
    # float16 convolutions are slow on a CPU: 3 steps an epoch (48 images), no TTA.
    cfg = CifarConfig(model="fastnet_tiny", epochs=2, batch_size=16, eval_batch_size=16, whiten_bias_epochs=1,
                      precision="fp16", train_subset=48, tta=False)
    straight = train_and_evaluate(cfg, dataset, progress=False, log=lambda _: None)

    def killed_after_first_epoch(line):
        if line.lstrip().startswith("1 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, dataset, progress=False, log=killed_after_first_epoch, checkpoint_dir=tmp_path)
    resumed = train_and_evaluate(cfg, dataset, progress=False, log=lambda _: None, checkpoint_dir=tmp_path,
                                 resume=True)
    # 6 finite steps in a row: a scale restarted at the resume would have counted 3.
    assert int(straight.state.loss_scale.good_steps) == 6
    assert dataclasses.asdict(resumed.state.loss_scale) == dataclasses.asdict(straight.state.loss_scale)
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(straight.state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
