"""Transfer learning, the seeds' workflow: pretrained weights, a new head, three ways to fine-tune.

The source task is some classes of a data set (CIFAR-10's 0-4 by default), the target task the
others with a tenth of their training labels. The network is pretrained on the source (or
comes from `--weights`: a torchvision file or an fnlearn checkpoint), gets a fresh head for the
target's classes, and is trained three ways for the same number of steps: the head alone
(the backbone frozen, its BatchNorm in inference mode), everything (the backbone at
`--backbone-lr-scale` times the head's rate, 1 by default), and from scratch. Each run is
`recipes.cifar.train_and_evaluate`: the same loop, augmentation, evaluation and checkpoints
as the main job.
"""
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fnlearn import models
from fnlearn.checkpoint import load_variables, save_variables
from fnlearn.cli import check_seed
from fnlearn.data.dataset import Dataset
from fnlearn.data.subset import stratified_subset
from fnlearn.models.torchvision import RESNETS
from fnlearn.pytrees import leaf_paths
from fnlearn.recipes.cifar import (PRESETS, CifarConfig, ConfigError, check_resume, create_state, make_cifar_optimizer,
                                   train_and_evaluate)
from fnlearn.report import TensorBoardWriter
from fnlearn.tools.tensorboard import StepSummaries
from fnlearn.train import FROZEN, freeze, load_pretrained, partition
from fnlearn.train.finetune import matches

MODES = ("head_only", "full_finetune", "scratch")
_CIFAR_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(CifarConfig)}  # the fields both configs have


def _field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def _classes(text):
    return tuple(int(c) for c in text.split(","))


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """The whole transfer experiment. Each field's help is its `--flag`'s in `python -m experiments.transfer`."""
    data: str = _field("cifar10", _CIFAR_HELP["data"])
    data_dir: str | None = _field(None, _CIFAR_HELP["data_dir"])
    model: str = _field("resnet18_imagenet", "the network: torchvision's ResNet-18 by default, so --weights "
                                             "can be torchvision's own file")
    weights: str | None = _field(None, "start from these weights instead of pretraining on the source classes: "
                                       "a torchvision state_dict (.pth, .pt, .safetensors) or an fnlearn "
                                       "checkpoint folder")
    source_classes: str = _field("0,1,2,3,4", "the pretraining task's classes, comma-separated indices")
    target_classes: str = _field("5,6,7,8,9", "the transfer task's classes, comma-separated indices")
    label_fraction: float = _field(0.1, "the share of the target classes' training images that keep their "
                                        "labels (a class-balanced sample)")
    pretrain_epochs: float = _field(6.0, "passes over the source classes' training images")
    pretrain_batch_size: int = _field(256, "examples per pretraining step")
    epochs: float = _field(4.0, "passes over the labelled target images, the same for each of the three runs: a "
                                "fine-tuning budget (76 steps at the defaults)")
    batch_size: int = _field(128, "examples per transfer step")
    lr: float = _field(4.4, "peak learning rate of the head, and of the whole network from scratch, in "
                            "experiments.cifar's unit (per 1024 examples of a summed loss; 4.4 is 0.05 at batch 128)")
    backbone_lr_scale: float = _field(1.0, "full fine-tuning: the backbone's learning rate as a multiple of --lr "
                                           "(1 by default: the features of a small source task need to adapt; "
                                           "docs/performance.md compares 0.1, 0.3 and 1)")
    head: str = _field("fc", "the head's path pattern: re-initialised for the target classes, and the only part "
                             "head-only fine-tuning trains")
    seed: int = _field(0, "seed of every run's init, order and augmentation")

    def __post_init__(self):
        try:
            source, target = _classes(self.source_classes), _classes(self.target_classes)
        except ValueError:
            raise ValueError(f"--source-classes {self.source_classes!r} / --target-classes {self.target_classes!r}: "
                             f"pass comma-separated class indices, e.g. 0,1,2") from None
        if not source or not target or min(source + target) < 0:
            raise ValueError("--source-classes and --target-classes must be non-empty lists of class indices >= 0")
        if self.weights is None and set(source) & set(target):  # given weights: no source task here
            raise ValueError("--source-classes and --target-classes must be disjoint")
        if len(set(target)) < 2 or len(set(target)) != len(target) or len(set(source)) != len(source):
            raise ValueError("--target-classes needs at least 2 classes, and neither list may repeat one")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"--label-fraction {self.label_fraction}: must be in (0, 1]")
        for name in ("backbone_lr_scale", "lr", "epochs", "batch_size", "pretrain_epochs", "pretrain_batch_size"):
            value = getattr(self, name)
            if not 0 < value < math.inf:  # NaN fails too
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a finite number > 0")
        check_seed(self, "seed")
        if self.model not in models.names(task="image_classifier"):
            raise ValueError(f"unknown --model {self.model!r}: choose from "
                             f"{', '.join(models.names(task='image_classifier'))}")

    @property
    def torchvision_weights(self):
        """Whether `weights` names a torchvision state_dict file (a folder is an fnlearn checkpoint)."""
        return self.weights is not None and Path(self.weights).is_file()

    def run_config(self, phase):
        """The `recipes.cifar.CifarConfig` of "pretrain" or one of `MODES`: the resnet18 preset's
        recipe (Nesterov SGD on a triangular schedule, label smoothing, flip and translate 4),
        without TTA, at this config's sizes. Every run normalises its images as torchvision's
        weights expect (ImageNet's statistics) where `weights` is such a file, else as CIFAR-10's."""
        normalization = "imagenet" if self.torchvision_weights else "cifar10"
        base = dataclasses.replace(PRESETS["resnet18"], data=self.data, data_dir=self.data_dir, model=self.model,
                                   seed=self.seed, tta=False, normalization=normalization)
        if phase == "pretrain":
            return dataclasses.replace(base, epochs=self.pretrain_epochs, batch_size=self.pretrain_batch_size)
        return dataclasses.replace(base, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)


def class_subset(dataset, classes, label_fraction=1.0, seed=0):
    """The images of `classes` (indices into `dataset.class_names`), relabelled 0..len(classes)-1 in
    that order; of the training images, a class-balanced `label_fraction` sample."""
    classes = np.asarray(classes)
    if classes.max() >= len(dataset.class_names):
        raise ConfigError(f"class {classes.max()} does not exist: {dataset.source} has "
                          f"{len(dataset.class_names)} classes, 0..{len(dataset.class_names) - 1}")
    relabel = np.full(len(dataset.class_names), -1)
    relabel[classes] = np.arange(len(classes))

    def pick(images, labels, fraction):
        keep = np.flatnonzero(np.isin(labels, classes))
        if missing := sorted(set(classes.tolist()) - set(labels[keep].tolist())):
            raise ConfigError(f"class {missing[0]} has no images in a split of {dataset.source}: "
                              "pick classes that all have train and test images")
        if fraction < 1:
            keep = keep[stratified_subset(labels[keep], max(len(classes), round(fraction * len(keep))), seed)]
        return images[keep], relabel[labels[keep]].astype(np.int32)

    train = pick(dataset.train_images, dataset.train_labels, label_fraction)
    test = pick(dataset.test_images, dataset.test_labels, 1.0)
    return Dataset(*train, *test, tuple(dataset.class_names[c] for c in classes), dataset.source)


def load_weights(cfg):
    """The variables `--weights` names: a torchvision state_dict file, or an fnlearn checkpoint folder
    (`save_variables`'s, or a training run's checkpoints)."""
    path = Path(cfg.weights)
    if cfg.torchvision_weights:
        name = cfg.model.removesuffix("_imagenet")
        if not cfg.model.endswith("_imagenet") or name not in RESNETS:
            raise ConfigError(f"--weights {path} is a file, read as torchvision's: it needs --model "
                              f"{', '.join(n + '_imagenet' for n in RESNETS)}, not {cfg.model}")
        return models.from_torchvision(name, path)[1]
    if not path.is_dir():
        raise ConfigError(f"--weights {path} does not exist: pass a torchvision file or an fnlearn checkpoint folder")
    variables, meta = load_variables(path)
    saved_model = meta.get("model", meta.get("config", {}).get("model"))
    if saved_model not in (None, cfg.model):
        raise ConfigError(f"--weights {path} holds a {saved_model}, not the --model {cfg.model}: pass "
                          f"--model {saved_model}")
    return variables


def transfer_state(mode, pretrained, cfg):
    """A `make_state` for `train_and_evaluate` that starts run `mode` from `recipes.cifar.create_state`'s
    state (model, precision policy, weight average).

    scratch: that state as it is. head_only: the pretrained network under a fresh head; only the
    head trains, and the frozen backbone's BatchNorm stays in inference mode. full_finetune: the
    same start; everything trains, the backbone at `cfg.backbone_lr_scale` times the rate.
    """
    def make_state(run_cfg, key, sample, num_classes, total_steps, steps_per_epoch):
        state = create_state(run_cfg, key, sample, num_classes, total_steps, steps_per_epoch)
        if mode == "scratch":
            return state
        try:
            variables = load_pretrained(state.variables, pretrained, fresh=(cfg.head,))
            params = variables["params"]
            rules = [(cfg.head, "head")]
            transforms = {"head": make_cifar_optimizer(run_cfg, params, total_steps, steps_per_epoch)}
            default = FROZEN
            if mode == "full_finetune":
                scale = cfg.backbone_lr_scale  # decay scales too: its coefficient is weight_decay / lr
                backbone = dataclasses.replace(run_cfg, lr=run_cfg.lr * scale,
                                               weight_decay=run_cfg.weight_decay * scale)
                transforms["backbone"] = make_cifar_optimizer(backbone, params, total_steps, steps_per_epoch)
                default = "backbone"
            tx = partition(transforms, params, rules, default)
        except ValueError as e:  # weights that do not fit, or a --head that is not a head
            raise ConfigError(f"--weights / --head: {e}") from None
        return state.replace(params=params, batch_stats=variables.get("batch_stats"), tx=tx, opt_state=tx.init(params),
                             apply_fn=freeze(state.apply_fn, params, rules, default),
                             ema_params=None if state.ema_params is None else jax.tree.map(jnp.copy, variables))

    return make_state


# What a resumed experiment may change: where the data comes from.
RESUMABLE_CHANGES = frozenset({"data", "data_dir"})
# The fields that shape the pretraining alone: with `weights` there is none, and they do not count.
PRETRAINING = ("source_classes", "pretrain_epochs", "pretrain_batch_size")


def check_resumes(cfg, workdir, resume):
    """Whether any run of the experiment in `workdir` has saved a checkpoint.

    Raises ConfigError, before any data is loaded, where the checkpoints in `workdir` clash with
    `resume` or with `cfg`: the experiment's own fields (saved as `transfer_config.json`) and each
    run's (`recipes.cifar.check_resume`), naming each changed field."""
    phases = MODES if cfg.weights else ("pretrain", *MODES)
    saved_file = Path(workdir) / "transfer_config.json"
    started = any(p.name.isdigit() for phase in phases if (Path(workdir) / phase).is_dir()
                  for p in (Path(workdir) / phase).iterdir())
    if resume and started and saved_file.is_file():
        try:
            saved = json.loads(saved_file.read_text())
        except ValueError:
            raise ConfigError(f"{saved_file} is damaged: delete it to resume with the config given") from None
        changed = [f"--{name.replace('_', '-')} {saved.get(name)!r} (saved) != {value!r}"
                   for name, value in dataclasses.asdict(cfg).items()
                   if name not in RESUMABLE_CHANGES and not (cfg.weights and name in PRETRAINING)
                   and saved.get(name) != value]
        if changed:
            raise ConfigError(f"--resume with a config that differs from the experiment saved in {workdir}: "
                              f"{'; '.join(changed)}. Pass the saved values, or choose another --workdir")
    for phase in phases:
        check_resume(cfg.run_config(phase), Path(workdir) / phase, resume)
    return started


def _check_runs(cfg, source, target):
    """Raises ConfigError for what would otherwise fail only when its run starts, after pretraining
    (`source` is None where there is none)."""
    if source is not None and cfg.pretrain_batch_size > len(source.train_images):
        raise ConfigError(f"--pretrain-batch-size {cfg.pretrain_batch_size} is larger than the "
                          f"{len(source.train_images)} source images: pass a smaller batch")
    if cfg.batch_size > len(target.train_images):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(target.train_images)} labelled "
                          f"target images: pass a smaller batch or a larger --label-fraction")
    model = models.get(cfg.model, num_classes=len(target.class_names))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *target.train_images.shape[1:])))
    if not any(matches(path.split("/", 1)[-1], cfg.head) for path in leaf_paths(shapes)):
        raise ConfigError(f"--head {cfg.head!r} matches no parameter of {cfg.model}: pass its head's path, e.g. fc")


def run_transfer(cfg, dataset, workdir, *, pretrained=None, resume=False, log=print, progress=True,
                 tensorboard_every=0, detect_anomaly=False, profile=False):
    """Pretrains (unless given `pretrained` variables), then runs each of `MODES`; returns a dict of results.

    Writes under `workdir`: `pretrain/` (its checkpoints), `pretrained/` (the pretrained variables,
    `checkpoint.save_variables`), one checkpoint folder per mode, and `tensorboard/<phase>/` (each
    epoch's figures, and with `tensorboard_every` N every N-th step's, `tools.tensorboard`).
    Args:
      cfg: a `TransferConfig`.
      dataset: a `fnlearn.data.Dataset` holding the source and target classes.
      workdir: the folder for the outputs.
      pretrained: variables to transfer from (`load_weights(cfg)` reads `cfg.weights`); None:
        pretrain on the source classes.
      resume: continue each run from its checkpoints (`recipes.cifar.check_resume`).
      detect_anomaly: `train_and_evaluate`'s, for every run.
      profile: trace the first run's second call of steps into `workdir/profile` (`train_and_evaluate`).
    Returns:
      {"pretrain": RunResult or None, mode: RunResult for each of MODES}.
    """
    workdir = Path(workdir)
    # Given weights, there is no source task: its classes need not exist in this data set.
    source = class_subset(dataset, _classes(cfg.source_classes)) if pretrained is None else None
    target = class_subset(dataset, _classes(cfg.target_classes), cfg.label_fraction, cfg.seed)
    _check_runs(cfg, source, target)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "transfer_config.json"
    config_file.with_suffix(".tmp").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    config_file.with_suffix(".tmp").replace(config_file)
    results = {"pretrain": None}
    traced = [workdir / "profile"] if profile else []

    def train(run_cfg, data, phase, **kwargs):
        writer = TensorBoardWriter(workdir / "tensorboard" / phase)
        try:
            return train_and_evaluate(run_cfg, data, checkpoint_dir=workdir / phase, resume=resume, log=log,
                                      progress=progress, on_epoch=writer, detect_anomaly=detect_anomaly,
                                      summaries=StepSummaries(writer, tensorboard_every) if tensorboard_every else None,
                                      profile=traced.pop() if traced else None, **kwargs)
        finally:
            writer.close()

    if pretrained is None:
        log(f"pretraining {cfg.model} on {len(source.train_images)} images of {', '.join(source.class_names)}")
        run_cfg = cfg.run_config("pretrain")
        results["pretrain"] = train(run_cfg, source, "pretrain")
        state = results["pretrain"].state
        pretrained = jax.device_get(state.variables)
        save_variables(workdir / "pretrained", pretrained, {
            "model": cfg.model, "class_names": list(source.class_names),
            "test_accuracy": results["pretrain"].test_accuracy})
        log(f"pretrained: test accuracy {results['pretrain'].test_accuracy:.4f} on {len(source.test_images)} "
            f"images; weights in {workdir / 'pretrained'}")
    for mode in MODES:
        log(f"{mode}: {len(target.train_images)} labelled images of {', '.join(target.class_names)}")
        results[mode] = train(cfg.run_config(mode), target, mode, make_state=transfer_state(mode, pretrained, cfg))
    return results
