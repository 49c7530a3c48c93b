"""Checkpoints: exact round trips, the last N kept, a killed save, shape mismatches named, shared variables."""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnlearn import models
from fnlearn.checkpoint import CheckpointError, Checkpoints, load_variables, save_variables
from fnlearn.train import FROZEN, LossScale, TrainState, make_train_step, partition


def _state(num_classes=10, stage_sizes=(1, 1), ema=True, loss_scale=True, steps=2):
    """A resnet_tiny TrainState a few Adam steps in, with a frozen stem, a weight average and a loss scale."""
    model = models.ResNet(stage_sizes=stage_sizes, block_cls=models.BasicBlock, width=8, num_classes=num_classes)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    tx = partition({"rest": optax.adam(1e-2)}, variables["params"], [("conv1", FROZEN)], "rest")
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx, ema=ema,
                              loss_scale=LossScale.create() if loss_scale else None)
    step = jax.jit(make_train_step())
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    y = jnp.arange(8) % num_classes
    for _ in range(steps):
        state, _ = step(state, (x, y))
    return state


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_a_whole_train_state_round_trips_bit_exact(tmp_path):
    state = _state()
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, state, {"epoch": 1})
    fresh = _state(steps=0)
    restored, meta = checkpoints.restore(fresh)
    assert meta == {"epoch": 1}
    for field in ("step", "params", "opt_state", "batch_stats", "ema_params", "loss_scale"):
        _assert_equal(getattr(restored, field), getattr(state, field))
    assert int(restored.step) == 2 and restored.tx is fresh.tx


def test_only_the_last_n_are_kept(tmp_path):
    state = _state(steps=0, ema=False, loss_scale=False)
    checkpoints = Checkpoints(tmp_path, max_to_keep=2)
    for epoch in range(1, 5):
        checkpoints.save(epoch, state, {"epoch": epoch})
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 4]
    assert checkpoints.latest_epoch() == 4


def test_saving_an_epoch_at_or_below_the_latest_is_refused(tmp_path):
    state = _state(steps=0, ema=False, loss_scale=False)
    Checkpoints(tmp_path).save(3, state, {"epoch": 3})
    with pytest.raises(CheckpointError, match="already holds epoch 3, so epoch 1 was not saved"):
        Checkpoints(tmp_path).save(1, state, {"epoch": 1})  # orbax returns False and writes nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3"]


def test_a_damaged_epoch_is_named_and_deleting_it_resumes_from_the_one_before(tmp_path):
    state = _state(steps=0, ema=False, loss_scale=False)
    checkpoints = Checkpoints(tmp_path)
    for epoch in (1, 2):
        checkpoints.save(epoch, state, {"epoch": epoch})
    for file in (tmp_path / "2" / "meta").rglob("*"):
        if file.is_file():
            file.write_text("{not json")
    reader = Checkpoints(tmp_path, create=False)  # as a resumed run reads it
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*2: .*Delete that folder to resume"):
        reader.meta(reader.latest_epoch())
    shutil.rmtree(tmp_path / "2")
    reader = Checkpoints(tmp_path, create=False)
    assert reader.latest_epoch() == 1 and reader.meta(1) == {"epoch": 1}


def test_a_mismatched_model_is_refused_naming_every_leaf(tmp_path):
    Checkpoints(tmp_path).save(1, _state(num_classes=10, ema=False, loss_scale=False), {})
    with pytest.raises(CheckpointError) as error:  # read as a resumed run does, by a new manager
        Checkpoints(tmp_path).restore(_state(num_classes=5, stage_sizes=(1, 1, 1), ema=False, loss_scale=False, steps=0))
    message = str(error.value)
    assert message.startswith(f"checkpoint {tmp_path}/1 does not fit the model:")
    # fc's kernel: (16 features, 10 classes) saved, (32, 5) wanted, and Adam's two moments of it.
    assert "params/fc/kernel: saved (16, 10), model (32, 5)" in message
    assert "params/fc/bias: saved (10,), model (5,)" in message
    assert "opt_state/inner_states/rest/inner_state/0/mu/fc/kernel: saved (16, 10), model (32, 5)" in message
    missing = next(line for line in message.splitlines() if "missing from the checkpoint: " in line)
    assert "batch_stats/layer3_0/bn1/mean" in missing and "params/layer3_0/bn1/bias" in missing  # the third stage
    assert "not in the model" not in message


def test_extra_saved_leaves_are_named(tmp_path):
    Checkpoints(tmp_path).save(1, _state(stage_sizes=(1, 1, 1), ema=False, loss_scale=False, steps=0), {})
    with pytest.raises(CheckpointError, match=r"not in the model: .*params/layer3_0/bn1/bias, "):
        Checkpoints(tmp_path).restore(_state(ema=False, loss_scale=False, steps=0))


# Saves epoch 1, then a second, larger-valued state as epoch 2, which the test kills mid-write.
_SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    import numpy as np
    from fnlearn.checkpoint import Checkpoints
    from fnlearn.train import TrainState

    def state(value):  # 2 x 64 MiB of noise (no compression), so the write can be caught in the act
        rng = np.random.default_rng(int(value))
        params = {k: jnp.asarray(rng.standard_normal((4096, 4096), np.float32)) for k in "ab"}
        return TrainState(step=jnp.int32(value), params=params, opt_state=())

    checkpoints = Checkpoints(sys.argv[1])
    checkpoints.save(1, state(1.0), {"epoch": 1})
    print("saved 1", flush=True)
    checkpoints.save(2, state(2.0), {"epoch": 2})
    print("saved 2", flush=True)
""")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert saver.stdout.readline() == "saved 1\n"
    def size(file):  # TensorStore renames its own temporary files as it goes
        try:
            return file.stat().st_size if file.is_file() else 0
        except FileNotFoundError:
            return 0

    def written():  # bytes in orbax's temporary folder for epoch 2
        return sum(size(f) for tmp in tmp_path.glob("2.*") for f in tmp.rglob("*"))

    deadline = time.monotonic() + 60
    while written() < 16 * 2**20:  # killed with arrays half on disk
        assert saver.poll() is None and time.monotonic() < deadline, "the second save ended or never started"
        time.sleep(0.001)
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    assert not (tmp_path / "2").exists(), "killed too late: the second save had finished"

    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest_epoch() == 1
    template = TrainState(step=jnp.int32(0), params={"a": jnp.zeros((4096, 4096)), "b": jnp.zeros((4096, 4096))},
                          opt_state=())
    restored, meta = checkpoints.restore(template)
    assert meta == {"epoch": 1} and int(restored.step) == 1
    rng = np.random.default_rng(1)
    for k in "ab":
        np.testing.assert_array_equal(restored.params[k], rng.standard_normal((4096, 4096), np.float32))
    checkpoints.save(2, template, {"epoch": 2})  # the run can go on saving where the killed one stopped
    assert checkpoints.latest_epoch() == 2


def test_variables_are_shared_without_the_optimizer(tmp_path):
    state = _state(ema=False, loss_scale=False)
    save_variables(tmp_path / "weights", state.variables, {"model": "resnet_tiny", "classes": 10})
    variables, meta = load_variables(tmp_path / "weights", like=state.variables)
    assert meta == {"model": "resnet_tiny", "classes": 10}
    _assert_equal(variables, jax.device_get(state.variables))
    save_variables(tmp_path / "weights", jax.tree.map(jnp.zeros_like, state.variables), {})  # replaces it
    assert float(jnp.abs(load_variables(tmp_path / "weights")[0]["params"]["fc"]["kernel"]).max()) == 0.0


def test_saving_variables_swaps_a_whole_folder_in(tmp_path):
    variables = _state(ema=False, loss_scale=False, steps=0).variables
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file: pass a folder"):
        save_variables(tmp_path / "file", variables, {})
    save_variables(tmp_path / "weights", variables, {"n": 1})
    (tmp_path / "weights").rename(tmp_path / "weights.new")  # as a kill between the two renames leaves it
    loaded, meta = load_variables(tmp_path / "weights")
    assert meta == {"n": 1} and isinstance(loaded["params"]["fc"]["kernel"], np.ndarray)
    save_variables(tmp_path / "weights", variables, {"n": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "weights"]
    assert load_variables(tmp_path / "weights")[1] == {"n": 2}


def test_variables_load_from_a_training_checkpoint(tmp_path):
    state = _state()
    checkpoints = Checkpoints(tmp_path / "checkpoints" / "run0")  # experiments.cifar's layout
    checkpoints.save(1, _state(steps=0), {"epoch": 1})
    checkpoints.save(2, state, {"epoch": 2})
    variables, meta = load_variables(tmp_path / "checkpoints" / "run0")  # the folder: its last epoch
    assert meta == {"epoch": 2} and set(variables) == {"params", "batch_stats"}
    _assert_equal(variables, jax.device_get(state.variables))
    assert load_variables(tmp_path / "checkpoints" / "run0" / "1")[1] == {"epoch": 1}
    with pytest.raises(CheckpointError, match=re.escape(f"holds runs' checkpoint folders (run0): pass one of "
                                                        f"them, e.g. {tmp_path / 'checkpoints' / 'run0'}")):
        load_variables(tmp_path / "checkpoints")


def test_variables_that_do_not_fit_or_a_folder_that_is_no_checkpoint_are_refused(tmp_path):
    save_variables(tmp_path / "weights", _state(ema=False, loss_scale=False, steps=0).variables, {})
    like = _state(num_classes=5, ema=False, loss_scale=False, steps=0).variables
    with pytest.raises(CheckpointError, match=r"params/fc/kernel: saved \(16, 10\), model \(16, 5\)"):
        load_variables(tmp_path / "weights", like=like)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not an fnlearn checkpoint"):
        load_variables(tmp_path / "empty")


def test_variables_whose_array_files_are_gone_fail_in_one_line(tmp_path):
    save_variables(tmp_path / "weights", _state(ema=False, loss_scale=False, steps=0).variables, {})
    for file in (tmp_path / "weights" / "variables" / "ocdbt.process_0" / "d").iterdir():  # the arrays' data
        file.unlink()
    # In a process of its own: the failed restore's other reads report their errors as it exits.
    code = ("import sys\nfrom fnlearn.checkpoint import CheckpointError, load_variables\n"
            "try:\n    load_variables(sys.argv[1])\nexcept CheckpointError as e:\n    sys.exit(f'error: {e}')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "weights")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot read checkpoint {tmp_path / 'weights'}: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[:2000]
