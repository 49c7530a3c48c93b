"""CIFAR-10 classification: airbench94's and airbench94_muon's recipes, and ResNets.

`CifarConfig`'s defaults are the design behind the public CIFAR-10 speed record, airbench94
(Keller Jordan, 2024), written as pure JAX functions:
a frozen patch-whitening stem, Nesterov SGD with a triangular schedule, BatchNorm
biases at 64x the learning rate, label smoothing, alternating flip and translate,
lookahead to a weight average every 5 steps, and flip+translate test-time augmentation.
`optimizer="muon"` is the later record's (airbench94_muon): Muon on the conv filters
through `optax.contrib.muon`, Nesterov SGD on the rest; its preset, `DEFAULT_PRESET`, is
what `python -m experiments.cifar` runs.
"""
import dataclasses
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from fnlearn import models, parallel
from fnlearn.checkpoint import Checkpoints
from fnlearn.cli import check_seed
from fnlearn.data import augment
from fnlearn.data.subset import stratified_subset
from fnlearn.report import confusion_matrix
from fnlearn.tools.profile import report as profile_report
from fnlearn.train import (POLICIES, History, LossScale, StepProgress, TrainingDiverged, TrainState, batched, chunks,
                           cross_entropy, epoch_order, make_schedule, make_train_step, scan_steps)
from fnlearn.train.loop import first_false, first_nonfinite_step
from fnlearn.train.steps import find_step_anomaly, first_nonfinite


def _field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class CifarConfig:
    """One CIFAR training run. Defaults are airbench94's; the units are airbench's.

    `lr` and `weight_decay` are per 1024 examples of a *summed* loss, with the weight
    decay decoupled from the learning rate's size (see `make_cifar_optimizer` for the
    conversion to a mean loss); so the recipe keeps its meaning when the batch changes.
    Each field's help is its `--flag`'s help in `python -m experiments.cifar`.
    """
    data: str = _field("cifar10", "a TFDS name (cifar10, downloaded), or a folder or .tar.gz of "
                                  "<root>/{train,test}/<class>/*.jpg")
    data_dir: str | None = _field(None, "where prepared array_record files and extracted archives are kept "
                                        "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    skip_corrupt: bool = _field(False, "leave out unreadable images (listed in summary.json) instead of failing")
    model: str = _field("fastnet", "the network to train")
    epochs: float = _field(9.9, "passes over the training set; a fraction cuts the last one short "
                                "(airbench94: the tenth epoch is cut at 90%)")
    batch_size: int = _field(1024, "training examples per step")
    lr: float = _field(11.5, "peak learning rate, per 1024 examples of a summed loss (airbench's unit)")
    lr_peak_at: float = _field(0.23, "fraction of the steps over which the lr rises from 0.2x to its peak "
                                     "(0: start at the peak)")
    lr_end: float = _field(0.07, "where the lr falls to at the run's end, as a fraction of the peak")
    momentum: float = _field(0.85, "Nesterov momentum, in [0, 1)")
    weight_decay: float = _field(0.0153, "weight decay, in airbench's units (see --lr)")
    bias_lr_scale: float = _field(64.0, "the BatchNorm biases' lr (with muon, the whitening bias's too) as a "
                                        "multiple of --lr; their decay is not scaled with it")
    optimizer: str = _field("sgd", "sgd: Nesterov SGD on every group (airbench94); muon: Muon on the conv "
                                   "filters, Nesterov SGD on the rest (airbench94_muon)")
    muon_lr: float = _field(0.24, "Muon's step on the conv filters; the update is orthogonalised, so its "
                                  "unit depends on neither the loss nor the batch")
    muon_momentum: float = _field(0.6, "Muon's Nesterov momentum, in [0, 1)")
    muon_ns_steps: int = _field(3, "Newton-Schulz iterations per Muon update")
    label_smoothing: float = _field(0.2, "label smoothing, in [0, 1)")
    whiten_bias_epochs: int = _field(3, "the whitening stem's bias trains this many epochs, then freezes")
    lookahead_every: int = _field(5, "steps between lookahead syncs to the weight average (0: off)")
    translate: int = _field(2, "random shift in pixels, reflect-padded (0: off)")
    flip: str = _field("alternating", "alternating: each epoch flips the images the last one did not")
    tta: bool = _field(True, "test-time augmentation for the final evaluation: mirror and 1-pixel shifts")
    normalization: str = _field("cifar10", "the per-channel mean and std the images are normalised with: "
                                           "cifar10's, or imagenet's (what torchvision's weights expect)")
    precision: str = _field("fp32", "bf16: bfloat16 compute with float32 params; fp16: float16 compute "
                                    "with a dynamic loss scale (fnlearn.train.precision)")
    accumulate: int = _field(1, "split each batch into this many micro-batches run one after another, and "
                                "update once from their mean gradient: batch/K's memory, the batch's update "
                                "(BatchNorm: each micro-batch by its own statistics)")
    remat: bool = _field(False, "recompute each block's activations in the backward pass (activation "
                                "checkpointing): less memory, one more forward pass of every block")
    clip_norm: float = _field(0.0, "scale the gradients down to this global norm before each update "
                                   "(torch's clip_grad_norm_; 0: off)")
    fsdp: bool = _field(False, "split the params and optimizer state over the devices (FSDP-style) instead "
                               "of keeping a copy on each")
    seed: int = _field(0, "seed of the first run; run i uses seed + i")
    runs: int = _field(1, "independent runs, reported with their mean and spread")
    train_subset: int = _field(0, "train on a class-balanced sample of this many images (0: all)")
    test_subset: int = _field(0, "evaluate on a class-balanced sample of this many test images (0: all)")
    eval_batch_size: int = _field(1000, "test images per evaluation call")
    # XLA reuses one step's scratch memory for the next inside a scan, where a call
    # per step maps fresh pages every time.
    steps_per_execution: int = _field(4, "train steps per compiled call, run as one lax.scan (Keras's name); "
                                         "the same run, faster")

    @property
    def compute_dtype(self):
        """The dtype activations are computed in under `precision`."""
        return POLICIES[self.precision].compute_dtype

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            flag = "--" + name.replace("_", "-")
            if name in CHOICES and value not in CHOICES[name]:
                raise ValueError(f"unknown {flag} {value!r}: choose from {', '.join(CHOICES[name])}")
            if name in _RULES and not _RULES[name][0](value):
                raise ValueError(f"{flag} {value!r}: must be {_RULES[name][1]}")
        check_seed(self, "seed")


CHOICES = {"precision": tuple(POLICIES), "flip": ("alternating", "random", "none"), "optimizer": ("sgd", "muon"),
           "model": tuple(models.names(task="image_classifier")), "normalization": tuple(augment.NORMALIZATIONS)}


_POSITIVE = (lambda v: 0 < v < math.inf, "a finite number > 0")  # NaN fails every comparison
_NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
# The valid values of every numeric field (and CHOICES'), checked when a config is made: a bad
# one fails before any work.
_RULES = {
    **{name: _POSITIVE for name in ("epochs", "batch_size", "lr", "bias_lr_scale", "runs", "eval_batch_size",
                                    "steps_per_execution", "muon_lr", "muon_ns_steps",
                                    "accumulate")},
    **{name: _NON_NEGATIVE for name in ("weight_decay", "whiten_bias_epochs", "lookahead_every", "translate",
                                        "train_subset", "test_subset", "lr_end", "clip_norm")},
    **{name: _UNIT for name in ("momentum", "label_smoothing", "lr_peak_at", "muon_momentum")},
}


# airbench's unit of rate: per 1024 examples, times the steady-state gain of Nesterov momentum 0.85.
_AIRBENCH_UNIT = 1024 * (1 + 1 / (1 - 0.85))

PRESETS = {
    "airbench94": CifarConfig(),
    # airbench94_muon.py: batch 2000 for 8 epochs, a linear decay from the start, no lookahead; its
    # SGD rates per example of the summed loss (head 0.67, biases 0.053, decay 2e-6) in airbench's units.
    "airbench94_muon": CifarConfig(model="fastnet_muon", optimizer="muon", epochs=8, batch_size=2000,
                                   lr=0.67 * _AIRBENCH_UNIT, weight_decay=2e-6 * _AIRBENCH_UNIT,
                                   bias_lr_scale=0.053 / 0.67, lr_peak_at=0.0, lr_end=0.0, lookahead_every=0),
    # ResNet-18, CIFAR stem: Nesterov SGD with a mean-loss lr of 0.2 at batch 512
    # (4.4 = 0.2 * 1024 * (1 + 1/(1-0.9)) / 512) and coupled decay 5e-4 (0.0022 = 5e-4 * 4.4).
    "resnet18": CifarConfig(model="resnet18", epochs=40, batch_size=512, lr=4.4, lr_peak_at=0.2, lr_end=0.0,
                            momentum=0.9,
                            weight_decay=0.0022, bias_lr_scale=1.0, label_smoothing=0.1,
                            whiten_bias_epochs=0, lookahead_every=0, translate=4, flip="random"),
    # One short epoch on class-balanced subsets with a narrow net: a quick end-to-end check.
    "smoke": CifarConfig(model="fastnet_small", epochs=1, batch_size=256, train_subset=20000,
                         test_subset=2000, whiten_bias_epochs=1),
}


# What `python -m experiments.cifar` runs: on the 2-core CPU, airbench94_muon's 3 seeds averaged
# airbench94's accuracy in about a fifth less training time (docs/performance.md).
DEFAULT_PRESET = "airbench94_muon"


def sgd_rates(cfg):
    """`(lr, decay)`: the config's airbench units as SGD's rate and coupled decay for a mean loss.

    airbench steps PyTorch's SGD with lr = cfg.lr / k, k = 1024·(1 + 1/(1-momentum)), on
    a loss summed over the batch, and coupled decay cfg.weight_decay / cfg.lr. For the
    mean loss that is lr·B/k with the same coupled decay.
    """
    k = 1024 * (1 + 1 / (1 - cfg.momentum))
    return cfg.lr * cfg.batch_size / k, cfg.weight_decay / cfg.lr


def param_labels(params, muon=False):
    """Each parameter's optimizer group, for `optax.multi_transform`: "whiten_kernel",
    "whiten_bias" (a whitening stem's), "bn_bias" (BatchNorm biases), with `muon` "filter"
    (every other conv kernel), or "other"."""
    def label(path, leaf):
        names = [k.key for k in path]
        if names[0] == "whiten":
            return f"whiten_{names[-1]}"
        if any("bn" in n or "BatchNorm" in n for n in names) and names[-1] == "bias":
            return "bn_bias"
        if muon and leaf.ndim == 4:
            return "filter"
        return "other"

    return jax.tree_util.tree_map_with_path(label, params)


def learning_rates(cfg, total_steps):
    """`{name: fn(step)}`: the rates `make_cifar_optimizer` applies at each 1-based step: `lr` (the
    weights' SGD rate for a mean loss) and with Muon `muon_lr` (the conv filters')."""
    lr, _ = sgd_rates(cfg)
    shape = make_schedule("triangular", 1.0, total_steps, peak_at=cfg.lr_peak_at, end=cfg.lr_end)
    rates = {"lr": lambda step: lr * float(shape(step - 1))}
    if cfg.optimizer == "muon":
        rates["muon_lr"] = lambda step: cfg.muon_lr * float(shape(step - 1))
    return rates


def make_cifar_optimizer(cfg, params, total_steps, steps_per_epoch):
    """airbench's optimizer groups as one optax transform, for a mean (not summed) loss.

    The rates are `sgd_rates(cfg)`'s, on the triangular schedule. Groups: the whitening
    kernel is frozen; its bias trains for `whiten_bias_epochs`; BatchNorm biases get
    `bias_lr_scale`x the lr and 1/`bias_lr_scale` of the decay coefficient (so the same
    decay per step); all else the plain rate. With `optimizer="muon"`, as airbench94_muon:
    the conv filters take `muon_filters`' steps, and the whitening bias trains at the
    biases' rate, decaying linearly to 0 over its own steps.
    """
    lr, decay = sgd_rates(cfg)
    shape = make_schedule("triangular", 1.0, total_steps, peak_at=cfg.lr_peak_at, end=cfg.lr_end)
    whiten_steps = cfg.whiten_bias_epochs * steps_per_epoch

    def sgd(scale, schedule=shape, until=None):
        def rate(step):
            r = lr * scale * schedule(step)
            return r if until is None else jnp.where(step < until, r, 0.0)
        return optax.chain(optax.add_decayed_weights(decay / scale),
                           optax.sgd(rate, momentum=cfg.momentum, nesterov=True))

    groups = {"whiten_kernel": optax.set_to_zero(), "bn_bias": sgd(cfg.bias_lr_scale), "other": sgd(1.0)}
    if cfg.optimizer == "muon":
        groups["whiten_bias"] = sgd(cfg.bias_lr_scale, lambda step: 1 - step / max(whiten_steps, 1), whiten_steps)
        groups["filter"] = muon_filters(cfg, shape)
    else:
        groups["whiten_bias"] = sgd(1.0, until=whiten_steps)
    return optax.multi_transform(groups, param_labels(params, muon=cfg.optimizer == "muon"))


def muon_filters(cfg, schedule):
    """airbench94_muon's step on (kh, kw, C_in, C_out) conv filters: `optax.contrib.muon`
    (Nesterov momentum, then Newton-Schulz orthogonalisation of each filter bank as a
    (kh·kw·C_in, C_out) matrix) at `cfg.muon_lr` on `schedule`, after rescaling the filter
    bank to norm sqrt(C_out): the weights' scale stays fixed, as BatchNorm makes it moot."""
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    muon = optax.contrib.muon(lambda step: cfg.muon_lr * schedule(step), ns_steps=cfg.muon_ns_steps,
                              beta=cfg.muon_momentum, nesterov=True, muon_weight_dimension_numbers=dims)

    def renormalise(updates, state, params):
        # p <- p·s - lr·U as an update: u = p·(s - 1) - lr·U, with s = sqrt(C_out) / |p|.
        def rescale(u, p):
            return u + p * (jnp.sqrt(p.shape[-1]) / jnp.sqrt(jnp.sum(p * p)) - 1)
        return jax.tree.map(rescale, updates, params), state

    return optax.chain(muon, optax.GradientTransformation(lambda _: optax.EmptyState(), renormalise))


def lookahead(state, total_steps, every):
    """airbench's lookahead: every `every` steps, pull the average toward the weights and reset
    the weights to it; the average's decay rises as 0.95^5·(t/T)^3, and at the last step the
    weights take the average (pulled first where that step is also an `every`-th, as airbench
    does). Applies to params and BatchNorm statistics."""
    t = state.step
    pull = t % every == 0
    decay = 0.95**5 * (jnp.minimum(t, total_steps) / total_steps) ** 3  # past T it would extrapolate
    current = state.variables
    average = jax.tree.map(lambda a, w: jnp.where(pull, a + (1 - decay) * (w - a), a), state.ema_params, current)
    weights = jax.tree.map(lambda a, w: jnp.where(pull | (t >= total_steps), a, w), average, current)
    return state.replace(params=weights["params"], batch_stats=weights.get("batch_stats"),
                         ema_params=average)


def augment_batch(cfg, key, flip_base, images, indices, epoch):
    """Flip, translate and normalise a uint8 batch (B, H, W, C) on the device, to float32.

    `key` is this step's; `flip_base` is the run's, so alternating flips alternate across epochs.
    Float32 under bf16 too, as Keras feeds a mixed-precision model: each layer casts its input
    to its compute dtype, and FastNet's whitening stem computes in float32.
    """
    flip_key, shift_key = jax.random.split(key)
    if cfg.flip == "alternating":
        images = augment.alternating_flip(flip_base, images, indices, epoch)
    elif cfg.flip == "random":
        images = augment.random_flip(flip_key, images)
    if cfg.translate:
        images = augment.random_translate(shift_key, images, cfg.translate, mode="reflect")
    return augment.normalize(images, *augment.NORMALIZATIONS[cfg.normalization])


def make_batch_fn(cfg, images, labels, key):
    """`batch(state, indices, epoch) -> (x, y)`: the augmented batch of the step `state` takes next on
    `images[indices]`; its randomness comes from `key`, folded with the epoch and `state.step`."""
    flip_base, step_key = jax.random.split(key)

    def batch(state, indices, epoch):
        key = jax.random.fold_in(jax.random.fold_in(step_key, epoch), state.step)
        return augment_batch(cfg, key, flip_base, images[indices], indices, epoch), labels[indices]

    return batch


def make_train_fn(cfg, images, labels, total_steps, key, batch_sharding=None, summaries_every=0,
                  check_finite=False):
    """`train(state, indices, epoch) -> (state, metrics)`: for each row of `indices`
    (steps, batch), gather, augment (`make_batch_fn`), step and lookahead, all in one `lax.scan`.

    With `batch_sharding`, each batch is split over the devices as it says; `summaries_every` and
    `check_finite` are `make_train_step`'s. The metrics hold one value per step.
    """
    make_batch = make_batch_fn(cfg, images, labels, key)
    # The recipe reports loss and accuracy only, so it skips the grad-norm pass.
    step = make_train_step(partial(cross_entropy, label_smoothing=cfg.label_smoothing),
                           clip_norm=cfg.clip_norm or None, grad_norm=False, accumulate=cfg.accumulate,
                           summaries_every=summaries_every, check_finite=check_finite)

    def one_step(state, indices, epoch):
        batch = make_batch(state, indices, epoch)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        state, metrics = step(state, batch)
        if cfg.lookahead_every:
            state = lookahead(state, total_steps, cfg.lookahead_every)
        return state, metrics

    def train(state, indices, epoch):
        return scan_steps(partial(one_step, epoch=epoch))(state, indices)

    return train


def make_predict_fn(cfg, apply_fn, tta, batch_sharding=None):
    """`predict(variables, uint8 images) -> float32 logits`, with TTA if asked, `cfg.eval_batch_size`
    images at a time (normalised to float32, as `augment_batch`), each batch split as
    `batch_sharding` says."""

    def predict(variables, images):
        def logits(x):
            return apply_fn(variables, x, train=False).astype(jnp.float32)

        def batch_logits(batch):
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            x = augment.normalize(batch, *augment.NORMALIZATIONS[cfg.normalization])
            return augment.tta_logits(logits, x) if tta else logits(x)

        return batched(batch_logits, images, cfg.eval_batch_size)

    return predict


def create_state(cfg, key, train_images, num_classes, total_steps, steps_per_epoch):
    """The run's starting TrainState: `cfg.model` initialised from `key` (and from the first
    5000 of `train_images` where the registry declares a data-dependent init, as FastNet's
    whitening stem: pass a sample), the recipe's optimizer, and the weight average if
    lookahead is on."""
    model = models.get(cfg.model, num_classes=num_classes, dtype=cfg.compute_dtype, remat=cfg.remat)
    variables = model.init(key, jnp.zeros((1, *train_images.shape[1:]), jnp.float32))
    if data_init := models.data_init(cfg.model):
        sample = jnp.asarray(train_images[:5000])
        variables = data_init(variables, augment.normalize(sample, *augment.NORMALIZATIONS[cfg.normalization]))
    tx = make_cifar_optimizer(cfg, variables["params"], total_steps, steps_per_epoch)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx,
                              loss_scale=LossScale.create() if POLICIES[cfg.precision].loss_scale else None)
    if cfg.lookahead_every:
        state = state.replace(ema_params=jax.tree.map(jnp.copy, state.variables))
    return state


def compiled_bytes(compiled):
    """What XLA says a compiled program holds at once, per device: its arguments, outputs
    (less those aliased to donated arguments) and temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def backward_bytes(cfg, num_classes=10, image_shape=(32, 32, 3)):
    """The bytes one training batch of `cfg` keeps from its forward pass for its backward pass
    (the residuals `jax.vjp` holds), from shapes alone: what `cfg.remat` cuts, whatever a
    backend's scheduler then does with them."""
    model = models.get(cfg.model, num_classes=num_classes, dtype=cfg.compute_dtype, remat=cfg.remat)
    x = jax.ShapeDtypeStruct((cfg.batch_size, *image_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)

    def residuals(x, y):
        variables = model.init(jax.random.key(0), x[:1])

        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return cross_entropy(out, y)
        return jax.vjp(loss, variables["params"])[1]  # a pytree of the arrays kept for the backward pass

    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(residuals, x, y)))


def run_keys(seed):
    """`(init, order, augment)` keys: every random choice of a run comes from its seed, split once."""
    return jax.random.split(jax.random.key(seed), 3)


def whitening_sample(images, labels, n=5000):
    """A fixed class-balanced sample of `n` training images for a whitening stem, as airbench's
    first 5000 of a shuffled set (a folder's first 5000 would be airplanes only)."""
    return images[stratified_subset(labels, min(n, len(labels)))]


def _replay(cfg, train_fn, state, indices, bad, epoch, images, labels, augment_key, step, finite, checkpoint):
    """TrainingDiverged for row `bad` of a call of steps that began at `state` on `indices` (`finite`:
    the call's per-step, per-parameter flags): the rows before it are rerun to reach the last finite
    state, then its step's pass is checked layer by layer."""
    if bad:
        state, _ = train_fn(state, indices[:bad], epoch)
    batch = make_batch_fn(cfg, images, labels, augment_key)(state, indices[bad], epoch)
    anomaly = find_step_anomaly(state, partial(cross_entropy, label_smoothing=cfg.label_smoothing), batch)
    leaf = first_nonfinite(jax.tree.map(lambda f: np.asarray(f)[bad], finite)) or "loss"
    return TrainingDiverged(step, leaf, checkpoint=checkpoint, state=state, epoch=epoch + 1, anomaly=anomaly,
                            replayed=True)


class ConfigError(ValueError):
    """The config does not fit the data or the run saved in the checkpoint folder; the message names the flags."""


# Fields a resumed run may change: where the data comes from, how fast it runs, the final
# evaluation. Any other change would make the resumed run a different run.
RESUMABLE_CHANGES = frozenset({"data", "data_dir", "skip_corrupt", "runs", "tta", "eval_batch_size",
                               "steps_per_execution", "fsdp", "remat"})
# What a run saved before a field existed did, so a resume compares against that.
_BEFORE_FIELD = {"lr_peak_at": 0.2, "lr_end": 0.0, "optimizer": "sgd", "clip_norm": 0.0, "accumulate": 1,
                 "normalization": "cifar10"}


def check_devices(cfg, mesh):
    """Raises ConfigError if a batch of `cfg` does not split evenly over the devices of `mesh`
    (a training batch: over them and into `cfg.accumulate` micro-batches)."""
    try:
        parallel.check_divides(mesh, {"--batch-size": cfg.batch_size}, cfg.accumulate)
        parallel.check_divides(mesh, {"--eval-batch-size": cfg.eval_batch_size})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_resume(cfg, checkpoint_dir, resume, resumable=RESUMABLE_CHANGES):
    """The last epoch saved in `checkpoint_dir` to resume from (None: start afresh).

    Raises ConfigError if the folder holds checkpoints and `resume` is false, or if
    `cfg` (a config dataclass, with its run's seed) differs from the saved run's config
    in a field outside `resumable`, naming each such field and both values.
    """
    checkpoints = Checkpoints(checkpoint_dir, create=False)
    latest = checkpoints.latest_epoch()
    if latest is None:
        return None
    if not resume:
        raise ConfigError(f"{checkpoints.directory} already holds checkpoints (last epoch {latest}): pass "
                          f"--resume to continue that run, or choose another --workdir")
    saved = checkpoints.meta(latest).get("config", {})
    changed = [f"--{name.replace('_', '-')} {saved.get(name, _BEFORE_FIELD.get(name))!r} (saved) != {value!r}"
               for name, value in dataclasses.asdict(cfg).items()
               if name not in resumable and saved.get(name, _BEFORE_FIELD.get(name, value)) != value]
    if changed:
        raise ConfigError(f"--resume with a config that differs from the run saved in {checkpoints.directory}: "
                          f"{'; '.join(changed)}. Pass the saved values, or choose another --workdir")
    return latest


def _subsets(dataset, cfg):
    """Train and test arrays, each a fixed class-balanced sample where the config asks for one.

    The samples depend on the data only (not on the seed), so every run sees the same images.
    """
    out = []
    for images, labels, n, flag in ((dataset.train_images, dataset.train_labels, cfg.train_subset, "train"),
                                    (dataset.test_images, dataset.test_labels, cfg.test_subset, "test")):
        if n > len(images):
            raise ConfigError(f"--{flag}-subset {n} is larger than the {len(images)} {flag} images: "
                              f"pass at most {len(images)}, or 0 for all")
        if n:
            keep = stratified_subset(labels, n)
            images, labels = images[keep], labels[keep]
        out += [images, labels]
    if len(out[0]) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(out[0])} training images: "
                          f"pass at most {len(out[0])}")
    return out


def check_data(cfg, dataset):
    """Raises ConfigError where `cfg`'s subsets or batch do not fit `dataset`, as a run would when it starts."""
    _subsets(dataset, cfg)


def _chance_warning(num_classes, accuracy, loss=None):
    """A warning if `accuracy` (and the training `loss`, if given) are what a network that learnt nothing gets.

    Predicting every class alike costs ln(C) in cross-entropy, with or without label smoothing.
    """
    near_chance = accuracy < 1.25 / num_classes
    if loss is None:
        return f"the final test accuracy {accuracy:.4f} is chance level (1/{num_classes})" if near_chance else None
    if near_chance and abs(loss - math.log(num_classes)) < 0.05 * math.log(num_classes):
        return (f"the training loss {loss:.4f} is stuck at ln({num_classes}) and the accuracy {accuracy:.4f} at "
                f"chance: the network predicts every class alike")
    return None


@dataclasses.dataclass
class RunResult:
    """One run's outcome.

    Attributes:
      test_accuracy: the final evaluation's (with TTA if `cfg.tta`).
      test_accuracy_plain: the last epoch's plain evaluation.
      train_seconds: training only: no compilation, no evaluation.
      compile_seconds, eval_seconds: the latter is every evaluation's;
      final_eval_seconds: the final evaluation's alone.
      train_program_bytes: what the compiled train program holds at once, per device, data
        set included (`compiled_bytes`).
      history: the per-epoch `History`.
      confusion: the final evaluation's counts, a list of rows, row = true class.
      steps: the run's optimizer steps.
      state: the final TrainState.
    """
    test_accuracy: float
    test_accuracy_plain: float
    train_seconds: float
    compile_seconds: float
    eval_seconds: float
    final_eval_seconds: float
    train_program_bytes: int
    history: History
    confusion: list
    steps: int
    state: TrainState


def train_and_evaluate(cfg, dataset, *, run=0, checkpoint_dir=None, resume=False, mesh=None, log=print,
                       progress=True, on_epoch=None, make_state=create_state, profile=None, summaries=None,
                       detect_anomaly=False):
    """Trains one run of `cfg` on `dataset` and evaluates it; returns a `RunResult`.

    Args:
      cfg: a `CifarConfig`.
      dataset: a `fnlearn.data.Dataset` (uint8 images in memory).
      run: run index; the run's seed is `cfg.seed + run`.
      checkpoint_dir: where to save a checkpoint, with the config, after every epoch
        (None: no checkpoints).
      resume: continue from the last checkpoint in `checkpoint_dir`, if there is one
        (see `check_resume`).
      mesh: the devices to train on, data parallel (default: all of them, `parallel.data_mesh()`);
        the batch sizes must divide by their number.
      log: where the per-epoch table and warnings go.
      on_epoch: called as `on_epoch(epoch, record)` after each epoch trained in this
        call (1-based epoch; `record` maps each history name to the epoch's value).
      make_state: builds the starting TrainState, with `create_state`'s arguments (the
        transfer recipe passes one that loads pretrained weights and freezes some of them).
      profile: a folder: one call of steps (`steps_per_execution` of them; the second of this call's
        first epoch, or its only one) is traced there with `jax.profiler`, and its slowest ops are
        logged after that epoch (None: no trace).
      summaries: a `tools.tensorboard.StepSummaries`: every `summaries.every` steps, the step's loss,
        accuracy, gradient norm and learning rates, and histograms of the weights and gradients,
        written as each epoch ends.
      detect_anomaly: check every step for NaN/Inf (a sync after every call of steps); the step
        that broke is rerun from the last finite state layer by layer (`tools.find_anomaly`), and
        TrainingDiverged names the layer, forward or backward, and carries that state. One
        process only: the replay reads the whole state and batch on one device.
    Raises:
      ConfigError: the config does not fit the data or the saved run.
      TrainingDiverged: the training loss became NaN or Inf.
    """
    cfg = dataclasses.replace(cfg, seed=cfg.seed + run)
    if detect_anomaly and jax.process_count() > 1:
        raise ConfigError("--detect-anomaly runs in one process (its replay reads the whole state on one device): "
                          "rerun the diverging run alone, from its last checkpoint")
    mesh = parallel.data_mesh() if mesh is None else mesh
    check_devices(cfg, mesh)
    train_x, train_y, test_x, test_y = _subsets(dataset, cfg)
    latest = check_resume(cfg, checkpoint_dir, resume) if checkpoint_dir else None
    num_classes = len(dataset.class_names)
    steps_per_epoch = len(train_x) // cfg.batch_size
    total_steps = math.ceil(steps_per_epoch * cfg.epochs)
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    def epoch_steps(epoch):
        return min(steps_per_epoch, total_steps - epoch * steps_per_epoch)

    init_key, order_key, augment_key = run_keys(cfg.seed)
    state = make_state(cfg, init_key, whitening_sample(train_x, train_y), num_classes, total_steps, steps_per_epoch)
    if jax.process_count() > 1:
        # Every process must put the same state, and the whitening stem's eigenvectors differ in
        # their last bits with a process's device count (threads), so all take process 0's.
        state = multihost_utils.broadcast_one_to_all(state)
    # Placed before a restore, so the checkpoint is read straight into this layout.
    state_sharding = parallel.state_sharding(state, mesh, cfg.fsdp)
    state = jax.device_put(state, state_sharding)
    history, start_epoch, train_seconds = History(), 0, 0.0
    checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir else None
    if latest is not None:
        state, meta = checkpoints.restore(state, latest)
        start_epoch, train_seconds = meta["epoch"], meta["train_seconds"]
        # Checkpoints from before the shared history names called eval_accuracy test_accuracy.
        history = History({"eval_accuracy" if k == "test_accuracy" else k: v for k, v in meta["history"].items()})
        log(f"resumed from {checkpoints.directory}/{start_epoch} (epoch {start_epoch} of {n_epochs})")

    # The data sets stay whole on every device; each step gathers its batch, split over the devices.
    whole, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    images, labels, test_images = jax.device_put((train_x, train_y, test_x), whole)
    index_sharding = parallel.batch_sharding(mesh, axis=1)  # (steps, batch) indices
    t0 = time.perf_counter()
    train_fn = jax.jit(make_train_fn(cfg, images, labels, total_steps, augment_key, split,
                                     summaries_every=summaries.every if summaries else 0,
                                     check_finite=detect_anomaly),
                       donate_argnums=0, out_shardings=(state_sharding, whole))
    # One program per chunk length an epoch uses (a shorter last chunk gets its own).
    lengths = {len(c) for epoch in range(start_epoch, n_epochs)
               for c in chunks(epoch_steps(epoch), cfg.steps_per_execution)}
    train_fns = {n: train_fn.lower(state, jax.ShapeDtypeStruct((n, cfg.batch_size), jnp.int32,
                                                               sharding=index_sharding), 0).compile()
                 for n in lengths}
    eval_fns = {tta: jax.jit(make_predict_fn(cfg, state.apply_fn, tta, split), out_shardings=whole)
                .lower(state.variables, test_images).compile() for tta in {False, cfg.tta}}
    compile_seconds = time.perf_counter() - t0

    def evaluate(tta):
        predictions = np.asarray(jnp.argmax(eval_fns[tta](state.variables, test_images), -1))
        return float(np.mean(predictions == test_y)), predictions

    if profile is not None and start_epoch >= n_epochs:
        log("--profile: this run has no steps left to train, so nothing was traced")
    eval_seconds, warned = 0.0, None
    if start_epoch == 0:
        log(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'test acc':>8} {'seconds':>8}")
    for epoch in range(start_epoch, n_epochs):
        steps = epoch_steps(epoch)
        order = epoch_order(order_key, epoch, len(train_x), cfg.batch_size)
        t_epoch = time.perf_counter()
        metrics, profiled = [], None
        last_good = f"{checkpoints.directory}/{epoch}" if checkpoints and epoch else None  # for a divergence
        epoch_chunks = chunks(steps, cfg.steps_per_execution)
        # The traced call: this call's first epoch's second (a warm program), or its only one.
        traced = min(1, len(epoch_chunks) - 1) if profile is not None and epoch == start_epoch else None
        with StepProgress(steps, f"epoch {epoch + 1}/{n_epochs}", cfg.batch_size, disable=not progress) as bar:
            for i, c in enumerate(epoch_chunks):
                indices = jax.device_put(order[c.start:c.stop], index_sharding)
                if detect_anomaly:
                    before = jax.tree.map(jnp.copy, state)  # the call donates `state`
                if i == traced:
                    with jax.profiler.trace(str(profile), create_perfetto_trace=True):
                        state, m = jax.block_until_ready(train_fns[len(c)](state, indices, epoch))
                    profiled = c
                else:
                    state, m = train_fns[len(c)](state, indices, epoch)
                if detect_anomaly and (bad := first_false(m["all_finite"])) is not None:  # a sync
                    raise _replay(cfg, train_fn, before, indices, bad, epoch, images, labels, augment_key,
                                  epoch * steps_per_epoch + c.start + bad, m["finite"], last_good)
                metrics.append(m)
                bar.dispatched(len(c), m["loss"])
        metrics = jax.device_get(jax.tree.map(lambda *v: jnp.concatenate(v), *metrics))
        seconds = time.perf_counter() - t_epoch
        train_seconds += seconds
        # Under a loss scale, a skipped step is an overflow the scale absorbed, a divergence only
        # at the scale's floor; its loss stays out of the divergence check and the epoch's means.
        skipped = metrics.get("skipped", np.zeros(len(metrics["loss"]), bool))
        at_floor = LossScale.diverged(metrics.get("loss_scale", np.inf), skipped)
        checked = np.where(skipped, np.where(at_floor, np.nan, 0.0), metrics["loss"])
        if (bad := first_nonfinite_step(checked)) is not None:
            raise TrainingDiverged(epoch * steps_per_epoch + bad, checkpoint=last_good, epoch=epoch + 1)
        loss, accuracy = float(metrics["loss"][~skipped].mean()), float(metrics["accuracy"][~skipped].mean())
        if epoch and not warned:  # a first epoch may well end near chance
            warned = _chance_warning(num_classes, accuracy, loss)
            if warned:
                log(f"warning: after epoch {epoch + 1}, {warned}. Check the labels, or try a lower --lr")
        t_eval = time.perf_counter()
        eval_accuracy, _ = evaluate(False)
        eval_seconds += time.perf_counter() - t_eval
        record = {"train_loss": loss, "train_accuracy": accuracy, "eval_accuracy": eval_accuracy,
                  "epoch_seconds": seconds}
        history.append(record)
        if checkpoints:
            checkpoints.save(epoch + 1, state, {"epoch": epoch + 1, "train_seconds": train_seconds,
                                                "history": history, "config": dataclasses.asdict(cfg),
                                                "class_names": list(dataset.class_names)})
        if on_epoch:
            on_epoch(epoch + 1, record)
        if summaries:
            summaries(epoch * steps_per_epoch + 1, metrics, learning_rates(cfg, total_steps))
        log(f"{epoch + 1:>5} {loss:>10.4f} {accuracy:>9.4f} {eval_accuracy:>8.4f} {seconds:>8.1f}")
        if profiled:  # read after the epoch's clock stopped (the tracer's own start and stop are in it)
            log(profile_report(profile, train_fns[len(profiled)].as_text(), len(profiled),
                               epoch * steps_per_epoch + profiled.start + 1))
    if checkpoints:
        checkpoints.close()

    t_eval = time.perf_counter()
    final_accuracy, predictions = evaluate(cfg.tta)
    final_eval_seconds = time.perf_counter() - t_eval
    eval_seconds += final_eval_seconds
    if warning := _chance_warning(num_classes, final_accuracy):
        log(f"warning: {warning}. Check the labels, or try a lower --lr")
    return RunResult(test_accuracy=final_accuracy, test_accuracy_plain=history["eval_accuracy"][-1],
                     train_seconds=train_seconds, compile_seconds=compile_seconds, eval_seconds=eval_seconds,
                     final_eval_seconds=final_eval_seconds,
                     train_program_bytes=max((compiled_bytes(f) for f in train_fns.values()), default=0),
                     history=history,
                     confusion=confusion_matrix(test_y, predictions, num_classes).tolist(), steps=total_steps,
                     state=state)
