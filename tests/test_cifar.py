"""The CIFAR recipe and experiment on tiny generated image trees."""
import dataclasses
import gc
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar as cifar_experiment
from experiments import mnist as mnist_experiment
from fnlearn.checkpoint import CheckpointError, Checkpoints, load_variables
from fnlearn.data import DataError, load_dataset, online
from fnlearn.data.subset import stratified_subset
from fnlearn.ops import onednn
from fnlearn.report import TensorBoardWriter, read_events
from fnlearn.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from fnlearn.recipes.cifar import (PRESETS, CifarConfig, ConfigError, augment_batch, check_resume, create_state,
                                   lookahead, make_train_fn, param_labels, sgd_rates, train_and_evaluate)
from fnlearn.train import TrainingDiverged, TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, write_tree):
    root = tmp_path_factory.mktemp("tree")
    write_tree(root / "src")
    return load_dataset(root / "src", data_dir=root / "tfds")


TINY = CifarConfig(data="unused", model="fastnet_tiny", epochs=2, batch_size=16, eval_batch_size=16,
                   whiten_bias_epochs=1)


def test_one_step_lowers_the_loss(tiny_dataset):
    plain = dataclasses.replace(TINY, translate=0, flip="none", lookahead_every=0)
    state = create_state(plain, jax.random.key(0), tiny_dataset.train_images, 4, total_steps=10, steps_per_epoch=5)
    images, labels = jnp.asarray(tiny_dataset.train_images), jnp.asarray(tiny_dataset.train_labels)
    train = jax.jit(make_train_fn(plain, images, labels, total_steps=10, key=jax.random.key(1)))
    batch = jnp.arange(16)[None]  # one step
    state, first = train(state, batch, 0)
    _, second = train(state, batch, 0)  # the same batch, unaugmented: the step must have helped
    assert float(second["loss"][0]) < float(first["loss"][0])


# resnet18's step is left to -m slow (its net: test_resnet, test_parity_torch).
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p == "resnet18" else p
                                    for p in sorted(PRESETS)])
def test_one_step_of_each_preset(preset, tiny_dataset):
    """Each preset's own model and optimizer take a finite step that changes the weights."""
    cfg = dataclasses.replace(PRESETS[preset], batch_size=16)
    state = create_state(cfg, jax.random.key(0), tiny_dataset.train_images, 4, total_steps=10, steps_per_epoch=5)
    images, labels = jnp.asarray(tiny_dataset.train_images), jnp.asarray(tiny_dataset.train_labels)
    train = jax.jit(make_train_fn(cfg, images, labels, total_steps=10, key=jax.random.key(1)))
    new, metrics = train(state, jnp.arange(16)[None], 0)
    assert np.isfinite(metrics["loss"]).all()
    before, after = jax.tree.leaves(state.params), jax.tree.leaves(new.params)
    assert all(np.isfinite(a).all() for a in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after)) > len(before) // 2


MUON = PRESETS["airbench94_muon"]


def test_muon_preset_groups_its_parameters_as_airbench94_muon():
    """Muon takes the conv filters; SGD the head, the BatchNorm biases and the whitening bias."""
    params = create_state(MUON, jax.random.key(0), np.zeros((8, 32, 32, 3), np.uint8), 10, 10, 5).params
    labels = param_labels(params, muon=True)
    assert labels["whiten"] == {"kernel": "whiten_kernel", "bias": "whiten_bias"}
    for block in ("block1", "block2", "block3"):
        assert labels[block] == {"conv1": {"kernel": "filter"}, "conv2": {"kernel": "filter"},
                                 "bn1": {"bias": "bn_bias"}, "bn2": {"bias": "bn_bias"}}
    assert labels["fc"] == {"kernel": "other"}
    assert "filter" not in jax.tree.leaves(param_labels(params))  # the SGD recipe's groups are unchanged
    # airbench94_muon's per-example rates on the summed loss, as a mean loss's at batch 2000:
    # the head's lr 0.67 and coupled decay 2e-6 * 2000 / 0.67, the biases' lr 0.053.
    lr, decay = sgd_rates(MUON)
    assert (lr, decay * MUON.batch_size) == pytest.approx((0.67 * 2000, 2e-6 * 2000 / 0.67))
    assert lr * MUON.bias_lr_scale == pytest.approx(0.053 * 2000)
    assert float(jnp.std(params["fc"]["kernel"], ddof=1)) == pytest.approx(1.0)  # the unit-std head
    bias = np.abs(params["whiten"]["bias"])  # torch's default init, U(±1/sqrt(2*2*3)), not airbench94's zeros
    assert 0.1 < bias.max() <= 12**-0.5


def test_muon_first_step_is_airbench94_muon_s():
    """The first update of a filter bank: renormalise to norm sqrt(C_out), then step along the
    3-step Newton-Schulz orthogonalisation of the gradient, as the torch script's Muon does
    (in float32 here, as the (C_out, kh*kw*C_in) matrix it reshapes to)."""
    cfg = dataclasses.replace(MUON, model="fastnet_tiny")
    state = create_state(cfg, jax.random.key(0), np.zeros((8, 32, 32, 3), np.uint8), 10, 10, 5)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), state.params)
    updates, _ = jax.jit(state.tx.update)(grads, state.opt_state, state.params)
    p = np.asarray(state.params["block2"]["conv1"]["kernel"], np.float64)  # (3, 3, C_in, C_out)
    g = np.asarray(grads["block2"]["conv1"]["kernel"], np.float64)
    x = g.reshape(-1, g.shape[-1]).T  # (C_out, kh*kw*C_in), torch's layout up to a column order
    x = x / np.linalg.norm(x)
    for _ in range(3):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    expected = p * np.sqrt(p.shape[-1]) / np.linalg.norm(p) - cfg.muon_lr * x.T.reshape(p.shape) - p
    np.testing.assert_allclose(updates["block2"]["conv1"]["kernel"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_steps_per_execution_changes_the_speed_not_the_run(tiny_dataset):
    # 6 steps an epoch: in one call each, or in calls of 4 and 2 steps.
    runs = [train_and_evaluate(dataclasses.replace(TINY, steps_per_execution=k), tiny_dataset, progress=False,
                               log=lambda _: None) for k in (1, 4)]
    for a, b in zip(*(jax.tree.leaves(r.state.variables) for r in runs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[0].history["train_loss"], runs[1].history["train_loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="--steps-per-execution"):
        dataclasses.replace(TINY, steps_per_execution=0)


def test_whitening_kernel_is_frozen_and_its_bias_stops_after_its_epochs(tiny_dataset, tmp_path):
    cfg = dataclasses.replace(TINY, lookahead_every=0)  # a lookahead sync would move the bias in epoch 2
    result = train_and_evaluate(cfg, tiny_dataset, progress=False, log=lambda _: None, checkpoint_dir=tmp_path)
    params = result.state.params
    fresh = create_state(cfg, jax.random.split(jax.random.key(cfg.seed), 3)[0], tiny_dataset.train_images, 4,
                         total_steps=12, steps_per_epoch=6).params
    np.testing.assert_array_equal(params["whiten"]["kernel"], fresh["whiten"]["kernel"])
    assert not np.allclose(params["block1"]["conv1"]["kernel"], fresh["block1"]["conv1"]["kernel"])
    after_one = load_variables(tmp_path / "1")[0]["params"]["whiten"]["bias"]  # whiten_bias_epochs=1
    assert not np.allclose(after_one, fresh["whiten"]["bias"])
    np.testing.assert_array_equal(params["whiten"]["bias"], after_one)


def test_experiment_end_to_end_writes_everything(tiny_dataset, tmp_path):
    src = pathlib.Path(tiny_dataset.source)
    workdir = tmp_path / "run"
    summary = cifar_experiment.main([
        "--data", str(src), "--data-dir", str(src.parent / "tfds"), "--workdir", str(workdir),
        "--model", "fastnet_tiny", "--epochs", "3", "--batch-size", "16", "--eval-batch-size", "16",
        "--whiten-bias-epochs", "1", "--runs", "2", "--tensorboard-every", "4"])
    saved = json.loads((workdir / "summary.json").read_text())
    for key in ("test_accuracy", "train_seconds", "compile_seconds", "epochs", "model", "precision", "devices"):
        assert key in saved
    assert saved["model"] == "fastnet_tiny" and saved["epochs"] == 3 and saved["precision"] == "fp32"
    assert len(saved["devices"]) == 8  # the devices the run saw: conftest's fake ones
    assert saved["cpu_kernels"] == onednn.describe()
    assert len(saved["test_accuracy_runs"]) == 2
    assert saved["test_accuracy"] == pytest.approx(np.mean(saved["test_accuracy_runs"]))
    assert saved["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert saved["train_seconds"] > 0 and saved["compile_seconds"] > 0
    assert 0 < saved["final_eval_seconds"] < saved["eval_seconds"]
    assert summary["test_accuracy"] == saved["test_accuracy"]
    for name in ("curves.png", "confusion.png"):
        assert (workdir / name).stat().st_size > 1000
    # Per epoch, and with --tensorboard-every 4 per step: 96 images / 16 = 6 steps an epoch, 18 in all.
    events = read_events(workdir / "tensorboard" / "run1")
    assert [s for s, tag, _ in events if tag == "eval_accuracy"] == [1, 2, 3]
    assert [s for s, tag, _ in events if tag == "step/loss"] == [4, 8, 12, 16]
    # airbench94_muon's rate falls linearly from its peak over the 18 steps; step 4 applies step index 3's.
    lr = [v for s, tag, v in events if tag == "step/lr" and s == 4][0]
    assert lr == pytest.approx(sgd_rates(dataclasses.replace(PRESETS["airbench94_muon"], batch_size=16))[0] * 15 / 18)
    histograms = {tag for s, tag, _ in events if s == 16 and tag.split("/")[0] in ("weights", "gradients")}
    weights = {tag.split("/", 1)[1] for tag in histograms if tag.startswith("weights/")}
    assert weights == {tag.split("/", 1)[1] for tag in histograms if tag.startswith("gradients/")}
    assert "whiten/kernel" in weights and len(weights) > 10  # every parameter, the frozen stem's too
    assert (workdir / "checkpoints" / "run0" / "3").is_dir()
    # The first run's final confusion matrix: 4 classes of 8 test images each, row = true class.
    assert saved["class_names"] == ["class0", "class1", "class2", "class3"]
    assert np.array(saved["confusion"]).sum(1).tolist() == [8, 8, 8, 8]
    assert np.trace(saved["confusion"]) / 32 == pytest.approx(saved["test_accuracy_runs"][0])


def _scalars(folder):
    return [(tag, step) for step, tag, _ in read_events(folder)]


def test_resume_gives_the_same_params_as_an_uninterrupted_run(tiny_dataset, tmp_path):
    straight = train_and_evaluate(TINY, tiny_dataset, progress=False, log=lambda _: None,
                                  checkpoint_dir=tmp_path / "a")

    def killed_after_first_epoch(line):
        if line.lstrip().startswith("1 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(TINY, tiny_dataset, progress=False, log=killed_after_first_epoch,
                           checkpoint_dir=tmp_path / "b", on_epoch=TensorBoardWriter(tmp_path / "tb"))
    assert sorted(os.listdir(tmp_path / "b")) == ["1"]
    assert ("train_loss", 1) in _scalars(tmp_path / "tb")  # TensorBoard events: the killed run left its epoch
    with pytest.raises(ConfigError, match="--resume"):  # never overwritten without --resume
        train_and_evaluate(TINY, tiny_dataset, progress=False, log=lambda _: None, checkpoint_dir=tmp_path / "b")
    resumed = train_and_evaluate(TINY, tiny_dataset, progress=False, log=lambda _: None, checkpoint_dir=tmp_path / "b",
                                 resume=True, on_epoch=TensorBoardWriter(tmp_path / "tb"))
    for a, b in zip(jax.tree.leaves(straight.state.variables), jax.tree.leaves(resumed.state.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert resumed.history["train_loss"] == straight.history["train_loss"]
    losses = [step for tag, step in _scalars(tmp_path / "tb") if tag == "train_loss"]
    assert sorted(losses) == [1, 2]  # the resumed run added epoch 2 only


def test_a_corrupt_checkpoint_is_named_in_one_line(tiny_dataset, tmp_path, capfd):
    cfg = dataclasses.replace(TINY, epochs=1)
    train_and_evaluate(cfg, tiny_dataset, progress=False, log=lambda _: None, checkpoint_dir=tmp_path)
    for f in (tmp_path / "1" / "state" / "ocdbt.process_0" / "d").iterdir():  # the arrays' data
        f.write_bytes(b"garbage")
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=str(tmp_path / "1")) as error:
        train_and_evaluate(cfg, tiny_dataset, progress=False, log=lambda _: None,
                           checkpoint_dir=tmp_path, resume=True)
    assert "\n" not in str(error.value) and len(str(error.value)) < 400
    assert f"delete {tmp_path} to start the run again" in str(error.value)
    gc.collect()  # the failed restore's dropped reads report their errors when collected
    time.sleep(0.5)  # and when the reads still in flight finish
    assert "Traceback" not in capfd.readouterr().err


def test_lookahead_pulls_as_airbench_does_and_ends_on_the_average():
    def after(step, total_steps):  # weights 1, BatchNorm statistic 3, their average 0
        state = TrainState(step=jnp.int32(step), params={"w": jnp.ones(2)}, opt_state=(),
                           batch_stats={"m": jnp.full(2, 3.0)},
                           ema_params={"params": {"w": jnp.zeros(2)}, "batch_stats": {"m": jnp.zeros(2)}})
        out = lookahead(state, total_steps, every=5)
        return [float(out.params["w"][0]), float(out.ema_params["params"]["w"][0]), float(out.batch_stats["m"][0])]

    pull = lambda t, total: 1 - 0.95**5 * (t / total) ** 3  # noqa: E731 (how far the average moves)
    assert after(7, 20) == [1.0, 0.0, 3.0]  # between pulls: nothing changes
    np.testing.assert_allclose(after(5, 20), [pull(5, 20), pull(5, 20), 3 * pull(5, 20)], rtol=1e-6)
    assert after(12, 12) == [0.0, 0.0, 0.0]  # the last step: the weights take the average
    # The last step is also a pull: airbench pulls (decay 0.95^5), then the weights take the average.
    np.testing.assert_allclose(after(10, 10), [pull(10, 10), pull(10, 10), 3 * pull(10, 10)], rtol=1e-6)


def test_divergence_is_reported_with_the_epoch(tiny_dataset):
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train_and_evaluate(dataclasses.replace(TINY, lr=1e30), tiny_dataset, progress=False,
                           log=lambda _: None)


def test_bf16_policy_trains_with_float32_params(tiny_dataset):
    result = train_and_evaluate(dataclasses.replace(TINY, precision="bf16", epochs=1),
                                tiny_dataset, progress=False, log=lambda _: None)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(result.state.params))
    assert np.isfinite(result.history["train_loss"][0])
    _, captured = result.state.apply_fn(result.state.variables, tiny_dataset.test_images[:2].astype(np.float32),
                                        capture_intermediates=True, mutable=["intermediates"])
    assert captured["intermediates"]["block1"]["conv1"]["__call__"][0].dtype == jnp.bfloat16  # computed in bf16


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        cifar_experiment.main(["--precision", "fp8"])
    with pytest.raises(ValueError, match="unknown --precision 'fp8'"):
        CifarConfig(precision="fp8")
    with pytest.raises(ValueError, match="--flip"):
        CifarConfig(flip="sometimes")
    with pytest.raises(ValueError, match="unknown --model 'resnet9'"):
        CifarConfig(model="resnet9")
    with pytest.raises(ValueError, match="unknown --normalization 'mnist'"):
        CifarConfig(normalization="mnist")


def test_the_normalization_is_the_configs():
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
    for name, mean, std in [("cifar10", CIFAR10_MEAN, CIFAR10_STD), ("imagenet", IMAGENET_MEAN, IMAGENET_STD)]:
        cfg = CifarConfig(normalization=name, flip="none", translate=0)
        got = augment_batch(cfg, jax.random.key(0), jax.random.key(1), images, jnp.arange(4), 0)
        np.testing.assert_allclose(got, (images / 255 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)


def test_offline_without_data_says_what_to_pass(tmp_path, monkeypatch, capsys):
    # A test host that never resolves: offline here, and no download on a machine with internet.
    monkeypatch.setattr(online.Cifar10Builder, "URLS", {"archive": "https://fnlearn-test.invalid/cifar.tar.gz"})
    with pytest.raises(SystemExit) as exit_info:
        cifar_experiment.main(["--data-dir", str(tmp_path), "--workdir", str(tmp_path / "run")])
    message = str(exit_info.value.code)
    assert "--data" in message and "Traceback" not in message


def test_mnist_experiment_on_a_generated_tree(tmp_path, write_tree, capsys):
    write_tree(tmp_path / "mnist", per_class=(30, 10), size=28, channels=1, classes=3, suffix=".png")
    summary = mnist_experiment.main(["--data", str(tmp_path / "mnist"), "--data-dir", str(tmp_path / "tfds"),
                                     "--epochs", "3", "--batch-size", "16", "--workdir", str(tmp_path / "run"),
                                     "--tensorboard-every", "5", "--profile", "--detect-anomaly"])
    assert summary["test_accuracy"] > 0.9  # 3 grey levels: chance is 1/3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    events = read_events(tmp_path / "run" / "tensorboard")  # 90 images / 16: 5 steps an epoch
    assert [s for s, tag, _ in events if tag == "gradients/Linear_0/kernel"] == [5, 10, 15]
    assert [v for _, tag, v in events if tag == "step/lr"] == pytest.approx([1e-3] * 3)
    out = capsys.readouterr().out
    assert f"profile of step 2 in {tmp_path / 'run' / 'profile'}" in out and "dot" in out  # SimpleNet's matmuls


def test_smoke_preset_on_the_shared_cifar10(tmp_path, user_environ):
    """`--preset smoke` on the real (JPEG) CIFAR-10 must reach 50% on a test set of all ten classes:
    run as a user runs it, in its own process with the user's flags (one device, -O2)."""
    if not SHARED_CIFAR.exists():
        if os.environ.get("FNLEARN_REQUIRE_DATA") == "1":
            raise FileNotFoundError(f"FNLEARN_REQUIRE_DATA=1 but {SHARED_CIFAR} is missing")
        pytest.skip(f"{SHARED_CIFAR} not present")
    run = subprocess.run([sys.executable, "-m", "experiments.cifar", "--preset", "smoke", "--data", str(SHARED_CIFAR),
                          "--workdir", str(tmp_path)], cwd=ROOT, env=user_environ, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # The figure covers the class-balanced test subset: every class, each 1/10 of it.
    per_class = np.array(summary["confusion"]).sum(1)
    assert len(per_class) == 10 and (per_class == per_class.sum() // 10).all()
    assert summary["test_accuracy"] >= 0.50


def test_subsets_hold_every_class_in_its_proportion():
    labels = np.repeat([0, 1, 2], [500, 300, 200])  # class order, as a folder loads them
    keep = stratified_subset(labels, 100)
    assert np.bincount(labels[keep]).tolist() == [50, 30, 20]
    assert len(set(keep)) == 100 and (keep == stratified_subset(labels, 100)).all()  # fixed
    uneven = stratified_subset(np.repeat([0, 1, 2], 3), 4)  # shares 4/3 each: one class gets the extra
    assert sorted(np.bincount(np.repeat([0, 1, 2], 3)[uneven])) == [1, 1, 2]
    rare = np.repeat(np.arange(10), [1000] * 8 + [30] * 2)  # two classes whose shares (0.37) round to none
    counts = np.bincount(rare[stratified_subset(rare, 100)], minlength=10)
    assert counts.sum() == 100 and counts[8:].tolist() == [1, 1] and counts[:8].min() >= 12  # shares 12.3
    with pytest.raises(ValueError):
        stratified_subset(labels, 1001)


def test_the_recipe_evaluates_a_class_balanced_test_subset(tiny_dataset):
    # The tiny test split is in class order (8 of each class): its first 8 images are one class.
    result = train_and_evaluate(dataclasses.replace(TINY, epochs=1, test_subset=8, train_subset=48),
                                tiny_dataset, progress=False, log=lambda _: None)
    assert np.array(result.confusion).sum(1).tolist() == [2, 2, 2, 2]
    assert result.steps == 3  # 48 training images, 12 of each class, in batches of 16


def test_resume_with_a_changed_config_is_refused_naming_the_fields(tiny_dataset, tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, epochs=1)
    train_and_evaluate(cfg, tiny_dataset, progress=False, log=lambda _: None,
                       checkpoint_dir=tmp_path / "checkpoints" / "run0")
    with pytest.raises(ConfigError, match=r"--epochs 1 \(saved\) != 3"):
        check_resume(dataclasses.replace(cfg, epochs=3), tmp_path / "checkpoints" / "run0", resume=True)
    with pytest.raises(ConfigError, match=r"--model 'fastnet_tiny' \(saved\) != 'resnet_tiny'.*--lr 11.5"):
        check_resume(dataclasses.replace(cfg, model="resnet_tiny", lr=1.0), tmp_path / "checkpoints" / "run0",
                     resume=True)
    # What only changes speed or the final evaluation may change.
    same = dataclasses.replace(cfg, tta=False, eval_batch_size=8, steps_per_execution=1, data="moved")
    assert check_resume(same, tmp_path / "checkpoints" / "run0", resume=True) == 1
    # A run saved before the schedule's fields existed ran airbench's old schedule (peak at 0.2, end 0).
    meta = Checkpoints.meta
    monkeypatch.setattr(Checkpoints, "meta", lambda self, epoch: {"config": {
        k: v for k, v in meta(self, epoch)["config"].items() if k not in ("lr_peak_at", "lr_end")}})
    with pytest.raises(ConfigError, match=r"--lr-peak-at 0.2 \(saved\) != 0.23; --lr-end 0.0 \(saved\) != 0.07"):
        check_resume(cfg, tmp_path / "checkpoints" / "run0", resume=True)
    assert check_resume(dataclasses.replace(cfg, lr_peak_at=0.2, lr_end=0.0), tmp_path / "checkpoints" / "run0",
                        resume=True) == 1
    monkeypatch.undo()
    # The experiment refuses before it loads any data.
    src = pathlib.Path(tiny_dataset.source)
    with pytest.raises(SystemExit) as exit_info:
        cifar_experiment.main(["--data", str(src / "missing"), "--workdir", str(tmp_path), "--resume",
                               "--model", "fastnet_tiny", "--epochs", "2", "--batch-size", "16",
                               "--eval-batch-size", "16", "--whiten-bias-epochs", "1"])
    assert "--epochs 1 (saved) != 2" in str(exit_info.value.code)


@pytest.mark.parametrize("flags, message", [(["--batch-size", "4096"], "--batch-size 4096 is larger than the"),
                                            (["--train-subset", "9999"], "--train-subset 9999 is larger than the")])
def test_sizes_the_data_cannot_fill_are_refused_before_anything_is_written(tiny_dataset, tmp_path, flags, message):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        cifar_experiment.main(["--data", tiny_dataset.source, "--data-dir", str(tmp_path / "tfds"), "--workdir",
                               str(workdir), "--model", "fastnet_tiny", *flags])
    assert not workdir.exists()


def test_resume_with_nothing_saved_says_so_and_starts(tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cifar_experiment, "load_dataset", lambda *args, **kwargs: (_ for _ in ()).throw(
        DataError("stop here")))  # the notice comes before the data
    with pytest.raises(SystemExit, match="stop here"):
        cifar_experiment.main(["--data", "unused", "--workdir", str(tmp_path / "new"), "--resume"])
    assert "holds no checkpoints yet; starting the run afresh" in capsys.readouterr().out


BAD_ARGUMENTS = [["--eval-batch-size", "0"], ["--momentum", "1.0"], ["--train-subset", "-5"],
                 ["--test-subset", "-1"], ["--lr", "inf"], ["--lr", "nan"], ["--model", "simple_net"],
                 ["--epochs", "0"], ["--label-smoothing", "1"], ["--flip", "sometimes"], ["--runs", "0"]]


@pytest.mark.parametrize("bad", BAD_ARGUMENTS, ids=" ".join)
def test_bad_arguments_are_refused_before_any_work(bad, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cifar_experiment, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cifar_experiment.main(["--workdir", str(tmp_path / "run"), *bad])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and bad[0] in err.splitlines()[0]
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_workdir_or_data_dir_that_is_a_file_is_refused(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cifar_experiment.main(["--workdir", str(tmp_path / "file")])
    assert exit_info.value.code == 2 and "--workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cifar_experiment.main(["--data-dir", str(tmp_path / "file"), "--workdir", str(tmp_path / "run")])
    assert "--data-dir" in str(exit_info.value.code) and "Traceback" not in str(exit_info.value.code)


@pytest.mark.parametrize("flags, named", [(["--batch-size", "1000"], "--batch-size 1000"),
                                          (["--train-subset", "500"], "--train-subset 500"),
                                          (["--lr", "1e30"], "epoch 1")])
def test_errors_found_once_the_data_is_loaded_take_one_line(tiny_dataset, tmp_path, flags, named):
    src = pathlib.Path(tiny_dataset.source)
    with pytest.raises(SystemExit) as exit_info:
        cifar_experiment.main(["--data", str(src), "--data-dir", str(src.parent / "tfds"),
                               "--workdir", str(tmp_path), "--model", "fastnet_tiny", "--epochs", "1",
                               "--batch-size", "16", "--whiten-bias-epochs", "1", *flags])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and named in message and "\n" not in message
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_training_stuck_at_chance_is_warned(tiny_dataset):
    lines = []
    train_and_evaluate(dataclasses.replace(TINY, lr=1e4), tiny_dataset, progress=False, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert "after epoch 2" in warnings[0] and "ln(4)" in warnings[0]  # while training
    assert "final test accuracy" in warnings[1] and "chance" in warnings[1]  # and at the end
    lines = []
    train_and_evaluate(TINY, tiny_dataset, progress=False, log=lines.append)
    assert not any(line.startswith("warning:") for line in lines)


def test_the_experiment_runs_the_muon_record_by_default(tmp_path):
    cfg, _, _ = cifar_experiment.parse_config(["--workdir", str(tmp_path / "run")])
    assert cfg == PRESETS["airbench94_muon"] and cfg.optimizer == "muon"
    assert cifar_experiment.parse_config(["--preset", "airbench94", "--workdir", str(tmp_path / "run")])[0] == CifarConfig()


def test_profile_writes_a_trace_and_names_the_slowest_ops(tiny_dataset, tmp_path, capsys):
    src = pathlib.Path(tiny_dataset.source)
    cifar_experiment.main(["--data", str(src), "--data-dir", str(src.parent / "tfds"), "--workdir",
                           str(tmp_path / "run"), "--model", "fastnet_tiny", "--epochs", "1", "--batch-size", "16",
                           "--eval-batch-size", "16", "--whiten-bias-epochs", "1", "--profile"])
    assert list((tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    out = capsys.readouterr().out
    assert f"in {tmp_path / 'run' / 'profile'}" in out and "tensorboard --logdir" in out
    rows = out.split("the slowest ops, ms a step:\n")[1].splitlines()[:10]
    ops = [row.split()[1] for row in rows if row.strip() and row.split()[0].replace(".", "").isdigit()]
    assert ops and {"convolution", "fusion"} & set(ops)  # XLA's real instructions, by opcode


def test_detect_anomaly_names_the_layer_and_keeps_the_last_finite_state(tiny_dataset):
    # lr 1e30: the first step's update makes the second step's first conv overflow.
    with pytest.raises(TrainingDiverged, match=r"step 1 \(epoch 1\): first NaN/Inf: the output of block1/conv1 "
                                               r"\(forward\)") as err:
        train_and_evaluate(dataclasses.replace(TINY, lr=1e30, tta=False), tiny_dataset, progress=False,
                           log=lambda _: None, detect_anomaly=True)
    state = err.value.state
    assert int(state.step) == 1 and all(np.isfinite(a).all() for a in jax.tree.leaves(state.params))
