"""The transfer experiment on a tiny generated image tree: pretrain, three fine-tuning runs, weights in and out."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import transfer as transfer_experiment
from fnlearn import models
from fnlearn.checkpoint import load_variables
from fnlearn.data import load_dataset
from fnlearn.recipes import transfer as transfer_recipe
from fnlearn.recipes.cifar import ConfigError, train_and_evaluate
from fnlearn.recipes.transfer import TransferConfig, check_resumes, class_subset, load_weights, transfer_state
from fnlearn.report import read_events

# The transfer runs' flags, and the pretraining's (which --weights replaces).
TINY_TRANSFER = ["--model", "resnet_tiny", "--target-classes", "2,3", "--label-fraction", "0.5", "--epochs", "2",
                 "--batch-size", "8"]
TINY = [*TINY_TRANSFER, "--source-classes", "0,1", "--pretrain-epochs", "1", "--pretrain-batch-size", "16"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, write_tree):
    root = tmp_path_factory.mktemp("tree")
    return str(write_tree(root / "src"))


def test_class_subsets_relabel_and_keep_a_balanced_fraction(tree, tmp_path):
    dataset = load_dataset(tree, data_dir=tmp_path)
    target = class_subset(dataset, (3, 1), label_fraction=0.25)
    assert target.class_names == ("class3", "class1")
    assert np.bincount(target.train_labels).tolist() == [6, 6]  # a quarter of 24 per class
    assert np.bincount(target.test_labels).tolist() == [8, 8]  # every test image of both
    # Relabelled in the order given: label 0 is class3's colour (yellow: high red and green, low blue).
    assert target.train_images[target.train_labels == 0][..., 2].mean() < 120
    with pytest.raises(ConfigError, match="class 7 does not exist"):
        class_subset(dataset, (0, 7))
    sparse = dataset._replace(train_labels=np.where(dataset.train_labels == 1, 0, dataset.train_labels))
    with pytest.raises(ConfigError, match="class 1 has no images in a split"):
        class_subset(sparse, (3, 1), label_fraction=0.25)


def test_runs_from_torchvision_weights_normalise_as_imagenet(tmp_path):
    (tmp_path / "resnet18.pth").write_bytes(b"")
    assert TransferConfig().run_config("full_finetune").normalization == "cifar10"
    for phase in ("head_only", "full_finetune", "scratch"):
        assert TransferConfig(weights=str(tmp_path / "resnet18.pth")).run_config(phase).normalization == "imagenet"
    assert TransferConfig(weights=str(tmp_path)).run_config("head_only").normalization == "cifar10"  # fnlearn's


def test_the_experiment_end_to_end(tree, tmp_path, capsys):
    workdir = tmp_path / "run"
    summary = transfer_experiment.main(["--data", tree, "--data-dir", str(tmp_path / "tfds"),
                                        "--workdir", str(workdir), "--tensorboard-every", "3", *TINY])
    on_disk = json.loads((workdir / "summary.json").read_text())
    for mode in ("head_only", "full_finetune", "scratch"):
        assert 0 <= on_disk[mode] <= 1 and on_disk[mode] == summary[mode]
        assert len(on_disk["history"][mode]["eval_accuracy"]) == 2
    assert on_disk["steps"] == 6  # 2 epochs of 24 labelled images (half of 2 x 24) in batches of 8
    assert (workdir / "transfer.png").stat().st_size > 0
    for mode in ("head_only", "full_finetune", "scratch"):  # each run's TensorBoard events, per epoch and step
        events = read_events(workdir / "tensorboard" / mode)
        assert [s for s, tag, _ in events if tag == "eval_accuracy"] == [1, 2]
        assert [s for s, tag, _ in events if tag == "step/loss"] == [3, 6]
        assert [s for s, tag, _ in events if tag == "weights/fc/kernel"] == [3, 6]
    out = capsys.readouterr().out
    assert "head_only" in out and "transfer beats scratch by" in out

    pretrained, meta = load_variables(workdir / "pretrained")
    assert meta["model"] == "resnet_tiny" and meta["class_names"] == ["class0", "class1"]
    head_only, _ = load_variables(workdir / "head_only")
    full, _ = load_variables(workdir / "full_finetune")

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    for collection in ("params", "batch_stats"):  # the frozen backbone came through untouched
        assert same({k: v for k, v in head_only[collection].items() if k != "fc"},
                    {k: v for k, v in pretrained[collection].items() if k != "fc"})
    assert not same(full["params"]["layer1_0"], pretrained["params"]["layer1_0"])
    assert head_only["params"]["fc"]["kernel"].shape == (16, 2)

    # A finished experiment is not overwritten; --resume continues it (here: nothing left to train).
    with pytest.raises(SystemExit, match="pass --resume"):
        transfer_experiment.main(["--data", tree, "--data-dir", str(tmp_path / "tfds"), "--workdir", str(workdir),
                                  *TINY])
    again = transfer_experiment.main(["--data", tree, "--data-dir", str(tmp_path / "tfds"), "--workdir",
                                      str(workdir), "--resume", *TINY])
    assert [again[m] for m in ("head_only", "full_finetune", "scratch")] == \
        [summary[m] for m in ("head_only", "full_finetune", "scratch")]

    # Its pretrained weights start another experiment, which then skips pretraining.
    other = transfer_experiment.main(["--data", tree, "--data-dir", str(tmp_path / "tfds"), "--workdir",
                                      str(tmp_path / "other"), "--weights", str(workdir / "pretrained"),
                                      *TINY_TRANSFER])
    assert other["pretrain_test_accuracy"] is None and not (tmp_path / "other" / "pretrain").exists()
    assert other["head_only"] == summary["head_only"]  # same weights, same seed: the same run


@pytest.mark.parametrize("mode", ["head_only", pytest.param("full_finetune", marks=pytest.mark.slow)])
def test_a_resumed_fine_tuning_run_is_the_same_run(mode, tree, tmp_path):
    cfg = TransferConfig(model="resnet_tiny", source_classes="0,1", target_classes="2,3", epochs=2, batch_size=8)
    dataset = class_subset(load_dataset(tree, data_dir=tmp_path / "tfds"), (2, 3), 0.5)
    pretrained = models.get("resnet_tiny", num_classes=7).init(jax.random.key(5), jnp.zeros((1, 32, 32, 3)))

    def run(folder, **kwargs):
        return train_and_evaluate(cfg.run_config(mode), dataset, checkpoint_dir=tmp_path / folder, progress=False,
                                  make_state=transfer_state(mode, pretrained, cfg), **kwargs)

    def killed_after_first_epoch(line):
        if line.lstrip().startswith("1 "):
            raise KeyboardInterrupt

    straight = run("a", log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        run("b", log=killed_after_first_epoch)
    lines = []
    resumed = run("b", log=lines.append, resume=True)
    assert lines[0].startswith("resumed from") and lines[0].endswith("b/1 (epoch 1 of 2)")
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert resumed.history["train_loss"] == straight.history["train_loss"]


def test_resuming_with_changed_transfer_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer_recipe, "check_resume", lambda *args: None)  # each run's own check: test_cifar
    cfg = TransferConfig(model="resnet_tiny")
    (tmp_path / "transfer_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    changed = dataclasses.replace(cfg, label_fraction=0.2, data="elsewhere")
    check_resumes(changed, tmp_path, resume=True)  # no run has a checkpoint yet: nothing to compare with
    (tmp_path / "pretrain" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"--label-fraction 0.1 \(saved\) != 0.2\. Pass the saved values"):
        check_resumes(changed, tmp_path, resume=True)
    check_resumes(dataclasses.replace(cfg, data="elsewhere"), tmp_path, resume=True)  # the data may move
    # Given weights, the pretraining's fields do not count (an experiment saved with any of them resumes).
    given = dataclasses.replace(cfg, weights="w.pth")
    saved = dataclasses.replace(given, source_classes="5,6", pretrain_epochs=2.0)
    (tmp_path / "transfer_config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    (tmp_path / "head_only" / "1").mkdir(parents=True)
    check_resumes(given, tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"--label-fraction 0.1 \(saved\) != 0.2"):
        check_resumes(dataclasses.replace(given, label_fraction=0.2), tmp_path, resume=True)


def test_torchvision_weights_start_the_transfer(tmp_path):
    model = models.get("resnet18_imagenet", num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(shapes))))
    variables = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype), shapes)
    models.to_torchvision(variables, tmp_path / "resnet18.safetensors")
    # Given weights, no source task: the targets may be any classes, the default source ones included.
    cfg = TransferConfig(weights=str(tmp_path / "resnet18.safetensors"), target_classes="3,4,5,6,7")
    pretrained = load_weights(cfg)
    run_cfg = cfg.run_config("head_only")
    state = transfer_state("head_only", pretrained, cfg)(run_cfg, jax.random.key(2), np.zeros((1, 32, 32, 3)), 5,
                                                         total_steps=10, steps_per_epoch=5)
    assert state.params["fc"]["kernel"].shape == (512, 5)
    np.testing.assert_array_equal(state.params["layer4_1"]["conv2"]["kernel"],
                                  variables["params"]["layer4_1"]["conv2"]["kernel"])
    np.testing.assert_array_equal(state.batch_stats["bn1"]["var"], variables["batch_stats"]["bn1"]["var"])


@pytest.mark.parametrize("flags, message", [
    (["--weights", "nowhere"], "--weights nowhere does not exist"),
    (["--source-classes", "0,1", "--target-classes", "1,2"], "must be disjoint"),
    (["--target-classes", "a,b"], "pass comma-separated class indices"),
    (["--label-fraction", "0"], "--label-fraction 0.0: must be in (0, 1]"),
    (["--model", "simple_net"], "argument --model: invalid choice: 'simple_net'"),
    (["--pretrain-epochs", "0"], "--pretrain-epochs 0.0: must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be a finite number > 0"),
    (["--weights", "w.pth", "--pretrain-epochs", "2"], "--pretrain-epochs: for the pretraining, which --weights "
                                                        "replaces; drop it or --weights"),
])
def test_bad_arguments_are_refused_in_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        transfer_experiment.main(["--data", "unused", "--workdir", str(tmp_path), *flags])
    error = str(exit.value.code) if exit.value.code not in (1, 2) else capsys.readouterr().err
    assert message in error
    assert len(error.strip().splitlines()) <= 2 and "Traceback" not in error


@pytest.mark.parametrize("flags, message", [
    (["--label-fraction", "0.1"], "--batch-size 8 is larger than the 5 labelled target images"),  # 10% of 48
    (["--pretrain-batch-size", "64"], "--pretrain-batch-size 64 is larger than the 48 source images"),
    (["--head", "classifier"], "--head 'classifier' matches no parameter of resnet_tiny"),
    (["--target-classes", "2,12"], "class 12 does not exist"),
])
def test_runs_that_cannot_start_are_refused_before_pretraining(flags, message, tree, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        transfer_experiment.main(["--data", tree, "--data-dir", str(tmp_path / "tfds"), "--workdir", str(workdir),
                                  *TINY, *flags])
    assert not workdir.exists()  # nothing written, nothing trained


def test_a_torchvision_file_for_a_model_torchvision_lacks_is_refused(tmp_path):
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ConfigError, match="needs --model resnet18_imagenet, resnet34_imagenet, resnet50_imagenet, not resnet_tiny"):
        load_weights(TransferConfig(model="resnet_tiny", weights=str(file)))
