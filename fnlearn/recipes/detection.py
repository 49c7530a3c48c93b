"""Object detection on canvases of CIFAR-10 objects: a YOLO-style detector trained from scratch.

The canvases (`data.canvas`) stay on the device as uint8; each step gathers its batch,
flips and zooms it with its boxes (`data.augment`), and takes a step of `detection.loss`,
`steps_per_execution` steps to a compiled call. After each epoch the test canvases go
through the model and class-aware NMS in one compiled call, and COCO's mAP is computed on
the host (`detection.metrics`).
"""
import dataclasses
import math
import time
from functools import partial

import jax
import jax.numpy as jnp

from fnlearn import models
from fnlearn.checkpoint import Checkpoints
from fnlearn.cli import check_seed
from fnlearn.data import augment
from fnlearn.detection.loss import yolo_loss
from fnlearn.detection.metrics import mean_average_precision
from fnlearn.detection.predict import detect
from fnlearn.recipes.cifar import ConfigError, check_resume
from fnlearn.train import (POLICIES, History, StepProgress, TrainingDiverged, TrainState, batched, chunks,
                           epoch_order, make_optimizer, make_train_step, scan_steps)
from fnlearn.train.loop import first_nonfinite_step


def _field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """One detection run. Each field's help is its `--flag`'s in `python -m experiments.detection`."""
    data: str = _field("cifar10", "the classification set the canvases are made from: a TFDS name or a folder "
                                  "or .tar.gz of <root>/{train,test}/<class>/*.jpg")
    data_dir: str | None = _field(None, "where prepared array_record files are kept (default: $TFDS_DATA_DIR "
                                        "or ~/tensorflow_datasets)")
    train_canvases: int = _field(20000, "training canvases, made from the train split")
    test_canvases: int = _field(2000, "test canvases, made from the test split")
    canvas_seed: int = _field(0, "the canvases' seed (the same seed makes the same canvases)")
    model: str = _field("yolo_tiny", "the detector")
    epochs: int = _field(12, "passes over the training canvases")
    batch_size: int = _field(64, "canvases per step")
    lr: float = _field(3e-3, "AdamW's peak learning rate, reached after the warm-up, then a cosine decay to 0")
    warmup_epochs: float = _field(1.0, "epochs of linear warm-up from 0 (at most half the run)")
    weight_decay: float = _field(5e-4, "AdamW's decoupled weight decay (not on biases and norms)")
    flip: bool = _field(True, "mirror half the training canvases, boxes with them")
    zoom: float = _field(0.25, "zoom each training canvas by a factor in [1 - zoom, 1 + zoom], boxes with it (0: off)")
    precision: str = _field("fp32", "bf16: bfloat16 compute with float32 params")
    seed: int = _field(0, "init, order and augmentation seed")
    steps_per_execution: int = _field(4, "train steps per compiled call")
    eval_batch_size: int = _field(200, "test canvases per evaluation call")

    def __post_init__(self):
        for name in ("train_canvases", "test_canvases", "epochs", "batch_size", "steps_per_execution",
                     "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be > 0")
        for name in ("lr", "warmup_epochs", "weight_decay", "zoom"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be a finite number >= 0")
        check_seed(self, "seed")
        check_seed(self, "canvas_seed")
        if self.batch_size > self.train_canvases:
            raise ValueError(f"--batch-size {self.batch_size} is larger than the {self.train_canvases} "
                             f"--train-canvases: pass a smaller batch or more canvases")
        if self.zoom >= 1:
            raise ValueError(f"--zoom {self.zoom}: must be below 1")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision {self.precision!r}: choose fp32 or bf16")
        if self.model not in models.names(task="detector"):
            raise ValueError(f"--model {self.model!r}: choose one of {', '.join(models.names(task='detector'))}")


PRESETS = {
    "default": DetectionConfig(),
    # A minute's check end to end: few canvases, one epoch.
    "smoke": DetectionConfig(train_canvases=1024, test_canvases=256, epochs=1, batch_size=32),
}
# Fields a resumed run may change: where the data is read from, and how fast it runs.
RESUMABLE = frozenset({"data", "data_dir", "steps_per_execution", "eval_batch_size"})


def normalise(images):
    """uint8 (B, H, W, C) canvases as float32 in [0, 1], as YOLOv5 feeds them."""
    return images.astype(jnp.float32) / 255.0


def make_detector(cfg, num_classes):
    return models.get(cfg.model, num_classes=num_classes, dtype=POLICIES[cfg.precision].compute_dtype)


def create_state(cfg, key, num_classes, image_size, total_steps, steps_per_epoch):
    model = make_detector(cfg, num_classes)
    variables = model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    tx = make_optimizer("adamw", cfg.lr, weight_decay=cfg.weight_decay, schedule="warmup_cosine",
                        total_steps=total_steps,
                        warmup_steps=min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2))
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)


def make_train_fn(cfg, model_cls, images, boxes, classes, key):
    """`train(state, indices (steps, batch)) -> (state, metrics)`: gather, augment, step, in one `lax.scan`."""
    loss = partial(yolo_loss, strides=model_cls.STRIDES, anchors=model_cls.ANCHORS)
    step = make_train_step(loss, grad_norm=False)

    def one_step(state, indices):
        flip_key, zoom_key = jax.random.split(jax.random.fold_in(key, state.step))
        x, b, c = images[indices], boxes[indices], classes[indices]
        if cfg.flip:
            x, b = augment.random_flip_boxes(flip_key, x, b, c)
        x = normalise(x)
        if cfg.zoom:
            x, b, c = augment.random_scale_boxes(zoom_key, x, b, c, (1 - cfg.zoom, 1 + cfg.zoom))
        return step(state, (x, (b, c)))

    return scan_steps(one_step)


def make_predict_fn(cfg, model_cls, apply_fn, **nms):
    """`predict(variables, uint8 images) -> (boxes, scores, classes, valid)`, `eval_batch_size` at a time."""
    def predict(variables, images):
        def one_batch(batch):
            outputs = apply_fn(variables, normalise(batch), train=False)
            return detect(outputs, model_cls.STRIDES, model_cls.ANCHORS, **nms)
        return batched(one_batch, images, cfg.eval_batch_size)
    return predict


def score(predictions, test, num_classes):
    """COCO's mAP of `predictions` ((boxes, scores, classes, valid) host arrays) on the test `Canvases`."""
    boxes, scores, classes, valid = predictions
    detections = [(boxes[i][valid[i]], scores[i][valid[i]], classes[i][valid[i]]) for i in range(len(boxes))]
    truth = [(test.boxes[i, :test.counts[i]], test.classes[i, :test.counts[i]]) for i in range(len(test.boxes))]
    return mean_average_precision(detections, truth, num_classes)


@dataclasses.dataclass
class DetectionResult:
    """A run's outcome: the last epoch's mAPs, its training time (no compile, no evaluation), the
    per-epoch history, the final state and the test predictions."""
    map50: float
    map50_95: float
    train_seconds: float
    compile_seconds: float
    history: History
    state: TrainState
    predictions: tuple


def train_and_evaluate(cfg, train, test, num_classes, *, checkpoint_dir=None, resume=False, log=print,
                       progress=True, on_epoch=None):
    """Trains `cfg`'s detector on the `train` canvases, scoring mAP on `test` after each epoch.

    Args:
      cfg: a `DetectionConfig`.
      train, test: `data.canvas.Canvases`.
      num_classes: the classes' count.
      checkpoint_dir: where each epoch's checkpoint goes, with the config (None: none).
      resume: continue the run saved there.
      log: where the per-epoch table goes.
      on_epoch: `on_epoch(epoch, record)` after each epoch (1-based).
    Returns:
      a `DetectionResult`.
    Raises:
      ConfigError: the batch is larger than the training set, or the saved run differs.
      TrainingDiverged: the loss became NaN or Inf.
    """
    if cfg.batch_size > len(train.images):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(train.images)} training "
                          f"canvases: pass at most {len(train.images)}")
    latest = check_resume(cfg, checkpoint_dir, resume, RESUMABLE) if checkpoint_dir else None
    steps_per_epoch = len(train.images) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    init_key, order_key, augment_key = jax.random.split(jax.random.key(cfg.seed), 3)
    model_cls = type(make_detector(cfg, num_classes))
    state = create_state(cfg, init_key, num_classes, train.images.shape[1], total_steps, steps_per_epoch)
    history, start_epoch, train_seconds = History(), 0, 0.0
    checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir else None
    if latest is not None:
        state, meta = checkpoints.restore(state, latest)
        start_epoch, train_seconds, history = meta["epoch"], meta["train_seconds"], History(meta["history"])
        log(f"resumed from {checkpoints.directory}/{start_epoch} (epoch {start_epoch} of {cfg.epochs})")
    images, boxes, classes = jax.device_put((train.images, train.boxes, train.classes))
    test_images = jax.device_put(test.images)
    t0 = time.perf_counter()
    train_fn = jax.jit(make_train_fn(cfg, model_cls, images, boxes, classes, augment_key), donate_argnums=0)
    # One program per chunk length (none when the restored run has nothing left to train).
    lengths = {len(c) for c in chunks(steps_per_epoch, cfg.steps_per_execution)} if start_epoch < cfg.epochs else ()
    train_fns = {n: train_fn.lower(state, jax.ShapeDtypeStruct((n, cfg.batch_size), jnp.int32)).compile()
                 for n in lengths}
    predict_fn = jax.jit(make_predict_fn(cfg, model_cls, state.apply_fn)).lower(state.variables,
                                                                              test_images).compile()
    compile_seconds = time.perf_counter() - t0
    predictions = None
    if start_epoch == 0:
        log(f"{'epoch':>5} {'loss':>8} {'box':>7} {'obj':>7} {'cls':>7} {'mAP50':>6} {'mAP':>6} {'seconds':>8}")
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(order_key, epoch, len(train.images), cfg.batch_size)
        t_epoch, metrics = time.perf_counter(), []
        with StepProgress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.batch_size,
                          disable=not progress) as bar:
            for c in chunks(steps_per_epoch, cfg.steps_per_execution):
                state, m = train_fns[len(c)](state, order[c.start:c.stop])
                metrics.append(m)
                bar.dispatched(len(c), m["loss"])
        metrics = jax.device_get(jax.tree.map(lambda *v: jnp.concatenate(v), *metrics))
        seconds = time.perf_counter() - t_epoch
        train_seconds += seconds
        if (bad := first_nonfinite_step(metrics["loss"])) is not None:
            raise TrainingDiverged(epoch * steps_per_epoch + bad, epoch=epoch + 1, checkpoint=(
                f"{checkpoints.directory}/{epoch}" if checkpoints and epoch else None))
        predictions = jax.device_get(predict_fn(state.variables, test_images))
        maps = score(predictions, test, num_classes)
        record = {"train_loss": metrics["loss"].mean(),
                  **{f"train_{k}": metrics[k].mean() for k in ("box", "obj", "cls")},
                  "eval_map50": maps["map50"], "eval_map50_95": maps["map50_95"], "epoch_seconds": seconds}
        history.append(record)
        if checkpoints:
            checkpoints.save(epoch + 1, state, {"epoch": epoch + 1, "train_seconds": train_seconds, "history": history,
                                                "config": dataclasses.asdict(cfg)})
        if on_epoch:
            on_epoch(epoch + 1, record)
        log(f"{epoch + 1:>5} {record['train_loss']:>8.4f} {record['train_box']:>7.4f} {record['train_obj']:>7.4f} "
            f"{record['train_cls']:>7.4f} {maps['map50']:>6.3f} {maps['map50_95']:>6.3f} {seconds:>8.1f}")
    if checkpoints:
        checkpoints.close()
    if predictions is None:  # nothing left to train: score the restored state
        predictions = jax.device_get(predict_fn(state.variables, test_images))
        maps = score(predictions, test, num_classes)
    return DetectionResult(maps["map50"], maps["map50_95"], train_seconds, compile_seconds, history, state,
                           predictions)
