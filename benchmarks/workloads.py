"""The bench's workloads: what each side runs, from the same random data (and, for the conv
nets, the same weights), as `Workload`s that `timing.measure` times.

Both sides do a tutorial loop's work: forward, loss, gradients, update. fnlearn's train
step leaves out its grad-norm metric (`make_train_step(grad_norm=False)`), which
PyTorch's loop does not compute either; it keeps its accuracy metric.
"""
import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.timing import PRECISIONS, Carried, Workload, compile_timed, torch_device
from fnlearn import models
from fnlearn.recipes.cifar import (CifarConfig, create_state, make_predict_fn, make_train_fn, run_keys, sgd_rates,
                                   whitening_sample)
from fnlearn.train import (TrainState, chunks, cross_entropy, epoch_order, make_optimizer, make_train_step,
                           mse)

# Both sides' losses: fnlearn's and the name of PyTorch's in torch.nn.functional.
LOSSES = {"mse": (mse, "mse_loss"), "cross_entropy": (cross_entropy, "cross_entropy")}
LR = 0.01  # every train workload's; momentum 0.9 (make_optimizer's default)
EPOCH_IMAGES = 50_000  # fastnet_epoch's training set: CIFAR-10's shape
TEST_IMAGES = 10_000  # cifar_run's test set on random data


class Start(NamedTuple):
    """What both sides of a train or inference workload start from."""
    model: str  # fnlearn's registry name
    variables: dict  # its initial variables
    batches: tuple  # fnlearn's (x, y), each (n, batch, ...): the steps take them in turn
    torch_net: Callable  # () -> a fresh PyTorch net (the conv nets' twins hold `variables`)
    torch_batches: list  # the same n (x, y), as the PyTorch net takes them
    loss: str = "cross_entropy"  # a name in LOSSES
    optimizer: str = "nesterov"  # make_optimizer's name ("adam", "momentum", "nesterov")


class EpochStart(NamedTuple):
    """What both sides of the CIFAR recipe's epoch start from."""
    cfg: CifarConfig
    images: np.ndarray  # (N, 32, 32, 3) random uint8, on the host
    labels: np.ndarray  # (N,) int32
    device: tuple  # the same images and labels on the device
    order: np.ndarray  # (steps per epoch, batch) image indices
    variables: dict  # the recipe's initial variables, whitening set from the images


class RunStart(NamedTuple):
    """What both sides of the CIFAR recipe's whole run start from."""
    cfg: CifarConfig
    data: tuple  # (train images, train labels, test images, test labels): uint8 NHWC and int32, on the host
    real: bool  # a real data set: its test accuracy means something
    num_classes: int
    sample: np.ndarray  # the class-balanced training images the whitening stem is set from
    orders: np.ndarray  # (epochs, steps per epoch, batch) image indices of every epoch
    total_steps: int  # the whole run's, over which the lr schedule and lookahead run
    steps: int  # the steps a run makes: `total_steps`, or fewer for a part run (no test pass)
    variables: dict  # the recipe's initial variables


def torch_mlp(torch, n_in, hidden, n_out):
    """Linear, ReLU, Linear (PyTorch's init)."""
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))


def mlp_start(torch, model, batches, widths, loss, optimizer):
    """A `Start` for a tutorial MLP; `batches` are stacked (n, batch, ...)."""
    variables = models.get(model).init(jax.random.key(0), batches[0][0])
    # np.array: a writable copy for torch
    xs, ys = (torch.from_numpy(np.array(a)).to(torch_device(torch)) for a in batches)
    if not ys.is_floating_point():
        ys = ys.long()  # torch's cross_entropy takes int64 class ids
    return Start(model, variables, batches, partial(torch_mlp, torch, *widths), list(zip(xs, ys)), loss, optimizer)


def regression_start(torch, w):
    """The seed regression: y = x² at `w.batch` points in [-1, 1], the whole set every step, Adam."""
    x = jnp.linspace(-1, 1, w.batch)[:, None]
    return mlp_start(torch, "regression_net", (x[None], x[None] ** 2), (1, 20, 1), "mse", "adam")


def simple_net_start(torch, w):
    """SimpleNet (784-128-10) on `w.steps` MNIST-shaped random batches, SGD with momentum."""
    kx, ky = jax.random.split(jax.random.key(0))
    batches = (jax.random.normal(kx, (w.steps, w.batch, 784)), jax.random.randint(ky, (w.steps, w.batch), 0, 10))
    return mlp_start(torch, "simple_net", batches, (784, 128, 10), "cross_entropy", "momentum")


def torch_images(torch, x):
    """NHWC array -> NCHW torch tensor in channels_last memory format (the same bytes), on the bench's device."""
    x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return x.to(torch_device(torch))


def conv_start(torch, w, *, model, size=32):
    """A `Start` for a conv net on one random batch of `w.batch` (size, size, 3) images, Nesterov SGD."""
    from benchmarks import torch_models  # imports torch, which `main` loads only once it needs it

    kx, ky = jax.random.split(jax.random.key(0))
    x, y = jax.random.normal(kx, (w.batch, size, size, 3)), jax.random.randint(ky, (w.batch,), 0, 10)
    variables = jax.jit(models.get(model).init)(jax.random.key(0), x[:1])
    return Start(model, variables, (x[None], y[None]), partial(torch_models.twin, model, variables),
                 [(torch_images(torch, x), torch.from_numpy(np.array(y)).long().to(torch_device(torch)))])


def torch_autocast(torch, dtype):
    """A context for PyTorch's forward passes: autocast to `dtype` ("bfloat16", "float16") on the
    bench's device, or none for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch_device(torch).type, dtype=getattr(torch, dtype))


def torch_train_step(torch, net, opt, loss_fn, next_batch, autocast=None, after_step=None):
    """A `step()` running one PyTorch eager train step on `next_batch()`'s (x, y).

    Args:
      autocast: run the forward pass and loss under autocast to this dtype name (None: float32).
      after_step: called with the step count after each optimizer step (e.g. lookahead).
    """
    count = itertools.count(1)

    def step():
        x, y = next_batch()
        opt.zero_grad(set_to_none=True)
        with torch_autocast(torch, autocast):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if after_step:
            after_step(next(count))

    return step


def torch_train(torch, start, autocast):
    """PyTorch's `step()` for a `Start`: a train step on a fresh net and optimizer."""
    net = start.torch_net().to(torch_device(torch)).train()
    params = [p for p in net.parameters() if p.requires_grad]
    if start.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=LR)
    else:
        opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=start.optimizer == "nesterov")
    loss_fn = getattr(torch.nn.functional, LOSSES[start.loss][1])
    return torch_train_step(torch, net, opt, loss_fn, itertools.cycle(start.torch_batches).__next__, autocast)


def fnlearn_train(start, precision, steps_per_call):
    """fnlearn's `(step(), compile seconds)` for a `Start`: one jitted train step a call, or
    `steps_per_call` steps in one `lax.scan` (a compiled run, as the CIFAR recipe's
    `steps_per_execution` runs them)."""
    model = models.get(start.model, **PRECISIONS[precision])
    state = TrainState.create(apply_fn=model.apply, variables=jax.tree.map(jnp.copy, start.variables),
                              tx=make_optimizer(start.optimizer, LR))
    train_step = make_train_step(LOSSES[start.loss][0], grad_norm=False)
    n = len(start.batches[0])
    if steps_per_call == 1:
        fn, inputs = train_step, [jax.tree.map(lambda b, i=i: b[i], start.batches) for i in range(n)]
    else:  # calls of `steps_per_call` batches each, taking the n batches in turn
        fn = partial(lax.scan, train_step)
        rows = np.arange(math.lcm(n, steps_per_call)).reshape(-1, steps_per_call) % n
        inputs = [jax.tree.map(lambda b, r=r: b[r], start.batches) for r in rows]
    compiled, compile_s = compile_timed(fn, state, inputs[0])
    return Carried(compiled, state, inputs), compile_s


def torch_infer(torch, start, autocast):
    """PyTorch's inference `step()` for a `Start` (BatchNorm from running statistics)."""
    net = start.torch_net().to(torch_device(torch)).eval()
    images, _ = start.torch_batches[0]

    def step():
        with torch.inference_mode(), torch_autocast(torch, autocast):
            net(images)
    return step


def fnlearn_infer(start, precision, steps_per_call):
    """fnlearn's jitted inference `(step(), compile seconds)` for a `Start`; one batch a call."""
    model = models.get(start.model, **PRECISIONS[precision])
    x = start.batches[0][0]
    predict, compile_s = compile_timed(partial(model.apply, train=False), start.variables, x, donate=False)
    return partial(predict, start.variables, x), compile_s


def epoch_start(torch, w):
    """An `EpochStart`: the recipe's default config at batch `w.batch`, on random CIFAR-shaped data."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (EPOCH_IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, EPOCH_IMAGES).astype(np.int32)
    cfg = CifarConfig(batch_size=w.batch)
    steps_per_epoch = EPOCH_IMAGES // w.batch
    order = rng.permutation(EPOCH_IMAGES)[: steps_per_epoch * w.batch].reshape(steps_per_epoch, w.batch)
    state = create_state(cfg, jax.random.key(0), images, 10, steps_per_epoch, steps_per_epoch)
    return EpochStart(cfg, images, labels, (jnp.asarray(images), jnp.asarray(labels)), order, state.variables)


def torch_epoch(torch, start, autocast):
    """PyTorch's recipe `step()`: airbench's work on tensors (gather, normalise, alternating
    flip, reflect-padded translate), the same net and optimizer groups, label smoothing and
    lookahead."""
    from benchmarks import torch_models

    device = torch_device(torch)
    cfg, steps_per_epoch = start.cfg, len(start.order)
    net = torch_models.twin("fastnet", start.variables).to(device).train()
    lr, decay = sgd_rates(cfg)
    opt = torch_models.airbench_optimizer(net, lr, cfg.momentum, decay, cfg.bias_lr_scale)
    images, labels = torch.from_numpy(start.images).to(device), torch.from_numpy(start.labels).long().to(device)
    flip_base = torch.rand(len(images), device=device) < 0.5
    average = [v.clone() for v in net.state_dict().values() if v.is_floating_point()]
    batches = ((torch_models.airbench_batch(images, idx, flip_base, 0, cfg.translate), labels[idx])
               for idx in itertools.cycle(torch.from_numpy(start.order).to(device)))

    def lookahead(t):
        # The timed runs together pass the epoch's last step: the decay then stays at its
        # end value (past 1 the sync would extrapolate, and the weights diverge); the work
        # each step is unchanged.
        if t % cfg.lookahead_every == 0:
            torch_models.lookahead_(average, net, 0.95**5 * min(t / steps_per_epoch, 1.0) ** 3)

    loss_fn = partial(torch.nn.functional.cross_entropy, label_smoothing=cfg.label_smoothing)
    return torch_train_step(torch, net, opt, loss_fn, batches.__next__, autocast, lookahead)


def fnlearn_epoch(start, precision, steps_per_call):
    """fnlearn's recipe `(step(), compile seconds)`: `make_train_fn` as the recipe calls it,
    `steps_per_call` steps of the epoch a call."""
    cfg, steps_per_epoch = dataclasses.replace(start.cfg, precision=precision), len(start.order)
    state = create_state(cfg, jax.random.key(0), start.images, 10, steps_per_epoch, steps_per_epoch)
    train = make_train_fn(cfg, *start.device, steps_per_epoch, jax.random.key(1))
    inputs = [(jnp.asarray(start.order[i:i + steps_per_call], jnp.int32), jnp.int32(0))  # (indices, epoch)
              for i in range(0, steps_per_epoch - steps_per_call + 1, steps_per_call)]
    compiled, compile_s = compile_timed(lambda s, b: train(s, *b), state, inputs[0])
    return Carried(compiled, state, inputs), compile_s


# The recipe's `create_state` as one program: eagerly, its init compiles op by op (seconds per model and dtype).
create_state_jit = jax.jit(create_state, static_argnums=(0, 3, 4, 5))


def airbench_lr(step, total_steps, peak_at=0.23, end=0.07):
    """airbench94's lr factor at optimizer step `step` (`legacy/airbench94.py`, `get_lr`): the PyTorch
    side's `LambdaLR`, and the reference fnlearn's schedule is tested against.

    It rises linearly from 0.2 to 1 over the first int(`peak_at`·`total_steps`) steps, then
    falls linearly to `end` at step `total_steps`; with `peak_at` 0 it starts at 1.
    """
    warmup_steps = int(total_steps * peak_at)
    if step < warmup_steps:
        frac = step / warmup_steps
        return 0.2 * (1 - frac) + 1.0 * frac
    frac = (step - warmup_steps) / (total_steps - warmup_steps)
    return 1.0 * (1 - frac) + end * frac


def run_calls(steps, steps_per_epoch, k):
    """`(epoch, range of its steps)` of each call of a run of `steps` steps, at most `k` steps a call."""
    return [(epoch, c) for epoch in range(math.ceil(steps / steps_per_epoch))
            for c in chunks(min(steps_per_epoch, steps - epoch * steps_per_epoch), k)]


def run_start(torch, w, *, cfg, steps, dataset):
    """A `RunStart` for `cfg` on `dataset` (a `fnlearn.data.Dataset`), or on random CIFAR-shaped
    data if None; a run makes `steps` steps (fewer than the whole run's: a part run)."""
    rng = np.random.default_rng(0)
    if dataset is None:
        data = (rng.integers(0, 256, (EPOCH_IMAGES, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, 10, EPOCH_IMAGES).astype(np.int32),
                rng.integers(0, 256, (TEST_IMAGES, 32, 32, 3), dtype=np.uint8),
                rng.integers(0, 10, TEST_IMAGES).astype(np.int32))
    else:
        data = (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)
    num_classes = len(dataset.class_names) if dataset else 10
    steps_per_epoch = len(data[0]) // cfg.batch_size
    total_steps = math.ceil(steps_per_epoch * cfg.epochs)
    # As the recipe's `train_and_evaluate`: its keys, epoch orders and whitening sample.
    init_key, order_key, _ = run_keys(cfg.seed)
    orders = np.stack([epoch_order(order_key, epoch, len(data[0]), cfg.batch_size)
                       for epoch in range(math.ceil(total_steps / steps_per_epoch))])
    sample = whitening_sample(data[0], data[1])
    state = create_state_jit(cfg, init_key, sample, num_classes, total_steps, steps_per_epoch)
    return RunStart(cfg, data, dataset is not None, num_classes, sample, orders, total_steps, steps,
                    state.variables)


def fnlearn_run(start, precision, steps_per_call):
    """fnlearn's `(run(), compile seconds)`: the recipe's run as `train_and_evaluate` makes it, less
    its per-epoch evaluations, logs and checkpoints: `make_train_fn`'s calls of `steps_per_execution`
    steps over every epoch, then the TTA pass of `make_predict_fn`. `run()` returns the test accuracy."""
    cfg = dataclasses.replace(start.cfg, precision=precision)
    train_x, train_y, test_x, test_y = start.data
    steps_per_epoch = start.orders.shape[1]
    init_key, _, augment_key = run_keys(cfg.seed)
    initial = create_state_jit(cfg, init_key, start.sample, start.num_classes, start.total_steps, steps_per_epoch)
    train = make_train_fn(cfg, jnp.asarray(train_x), jnp.asarray(train_y), start.total_steps, augment_key)
    test_images, test_labels = jnp.asarray(test_x), jnp.asarray(test_y)
    # (indices, epoch) of every call, on the device before the clock starts.
    inputs = [(jnp.asarray(start.orders[epoch, c.start:c.stop]), jnp.int32(epoch))
              for epoch, c in run_calls(start.steps, steps_per_epoch, cfg.steps_per_execution)]
    programs, compile_s = {}, 0.0
    for indices, epoch in inputs:
        if len(indices) not in programs:  # a shorter last call gets its own program
            programs[len(indices)], seconds = compile_timed(train, initial, indices, epoch)
            compile_s += seconds
    whole = start.steps == start.total_steps
    if whole:
        predict, seconds = compile_timed(make_predict_fn(cfg, initial.apply_fn, cfg.tta), initial.variables,
                                         test_images, donate=False)
        compile_s += seconds

    def run():
        state = jax.tree.map(jnp.copy, initial)  # each run starts afresh; the first call donates it
        for indices, epoch in inputs:
            state, _ = programs[len(indices)](state, indices, epoch)
        if not whole:
            jax.block_until_ready(state)
            return "part run"
        logits = predict(state.variables, test_images)
        accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test_labels))
        return accuracy if start.real else "random data"

    return run, compile_s


def torch_run(torch, start, autocast):
    """PyTorch's `run()`: airbench94's recipe, ported from fnlearn's: `torch_epoch`'s steps over every
    epoch on airbench's lr schedule (`airbench_lr`), the whitening bias trained for its first
    `whiten_bias_epochs` epochs, lookahead ending on the average, then the TTA pass. `run()`
    returns the test accuracy."""
    from benchmarks import torch_models

    device = torch_device(torch)
    cfg, (steps_per_epoch, batch) = start.cfg, start.orders.shape[1:]
    net = torch_models.twin(cfg.model, start.variables).to(device)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.array(a)).to(device) for a in start.data)
    train_y = train_y.long()
    orders = torch.from_numpy(start.orders).to(device)
    lr, decay = sgd_rates(cfg)
    schedule = partial(airbench_lr, total_steps=start.total_steps, peak_at=cfg.lr_peak_at,
                       end=cfg.lr_end)
    # airbench's summed loss, at lr / B and coupled decay x B: the mean loss's steps, with float16
    # gradients B times further from underflow (airbench trains in float16 with no loss scaling).
    loss_fn = partial(torch.nn.functional.cross_entropy, label_smoothing=cfg.label_smoothing, reduction="sum")
    total = start.total_steps

    def run():
        net.load_state_dict(initial)
        net.train()
        net.whiten.bias.requires_grad_(cfg.whiten_bias_epochs > 0)
        opt = torch_models.airbench_optimizer(net, lr / batch, cfg.momentum, decay * batch, cfg.bias_lr_scale)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        flip_base = torch.rand(len(train_x), device=device) < 0.5
        average = [v.clone() for v in net.state_dict().values() if v.is_floating_point()]
        t = 0
        for epoch, steps in run_calls(start.steps, steps_per_epoch, steps_per_epoch):
            # airbench freezes the bias so: its grad stays None, which SGD skips.
            net.whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
            for idx in orders[epoch, steps.start:steps.stop]:
                x = torch_models.airbench_batch(train_x, idx, flip_base, epoch, cfg.translate)
                opt.zero_grad(set_to_none=True)
                with torch_autocast(torch, autocast):
                    loss = loss_fn(net(x), train_y[idx])
                loss.backward()
                opt.step()
                scheduler.step()
                t += 1
                if not cfg.lookahead_every:
                    continue
                if t % cfg.lookahead_every == 0:  # as airbench and fnlearn's `lookahead`
                    torch_models.lookahead_(average, net, 0.95**5 * (t / total) ** 3)
                if t >= total:  # then the weights take the average
                    torch_models.lookahead_(average, net, 1.0)
        if start.steps < total:
            return "part run"  # `torch_finish` waits for CUDA's queued work
        net.eval()
        with torch.inference_mode(), torch_autocast(torch, autocast):
            logits = torch.cat([torch_models.tta_logits(net, x, translate=1) if cfg.tta else net(x).float()
                                for x in (torch_models.normalize(test_x[i:i + cfg.eval_batch_size])
                                          .contiguous(memory_format=torch.channels_last)
                                          for i in range(0, len(test_x), cfg.eval_batch_size))])
            accuracy = (logits.argmax(1) == test_y).float().mean().item()
        return accuracy if start.real else "random data"

    return run


def train_modes(steps):
    """fnlearn's train modes: one jitted step a call, and all `steps` in one compiled run."""
    return (("jit_step", 1), ("compiled_run", steps))


def basic(name, setup, batch, steps):
    """A tutorial MLP's train step: float32, PyTorch eager, each timed run lasting at least 0.1 s."""
    return Workload(name, "steps/s", batch, steps, setup, torch_train, fnlearn_train, train_modes(steps),
                    precisions=("fp32",), torch_modes=("fp32_eager",), min_seconds=0.1)


def conv_train(name, model, batch, steps, size=32):
    """A conv net's train step (cross-entropy, Nesterov SGD) on one random batch."""
    return Workload(name, "images/s", batch, steps, partial(conv_start, model=model, size=size),
                    torch_train, fnlearn_train, train_modes(steps))


def part_run_steps(fraction, steps_per_epoch, k):
    """`fraction` of an epoch's steps, as whole recipe calls of `k` steps (`steps_per_execution`), at least one."""
    return k * max(1, round(fraction * steps_per_epoch / k))


def fastnet_epoch(fraction=0.08, batch=1024):
    """The CIFAR recipe's epoch, timing `fraction` of its steps: whole recipe calls, at least one."""
    k = CifarConfig().steps_per_execution
    steps = part_run_steps(fraction, EPOCH_IMAGES // batch, k)
    return Workload("fastnet_epoch", "images/s", batch, steps, epoch_start, torch_epoch, fnlearn_epoch,
                    (("recipe_epoch", k),))


def cifar_run(cfg=CifarConfig(), fraction=0.08, dataset=None):
    """The CIFAR recipe's whole run of `cfg` on `dataset` (None: random CIFAR-shaped data), timed as
    airbench times itself: training and the final TTA pass. A `fraction` (not None) times that
    fraction of the first epoch instead (whole recipe calls), with no TTA pass and no accuracy.

    Its unit is the training images a run makes per second of the run. A run is one step:
    the first is the warm-up, and `--repeats` runs are timed. The PyTorch side ports airbench94's
    recipe (SGD, alternating flip, FastNet, no clipping or accumulation), so other configs are refused.
    """
    if (cfg.optimizer != "sgd" or cfg.flip != "alternating" or cfg.clip_norm or cfg.accumulate != 1
            or cfg.model not in ("fastnet", "fastnet_small", "fastnet_tiny")):
        raise ValueError("cifar_run's PyTorch side ports airbench94's recipe only (SGD, alternating flip, "
                         f"a FastNet, no clipping or accumulation), not optimizer={cfg.optimizer!r} "
                         f"flip={cfg.flip!r} model={cfg.model!r} clip_norm={cfg.clip_norm!r} "
                         f"accumulate={cfg.accumulate!r}")
    n_train = len(dataset.train_images) if dataset else EPOCH_IMAGES
    steps_per_epoch = n_train // cfg.batch_size
    steps = math.ceil(steps_per_epoch * cfg.epochs)
    if fraction is not None:
        steps = min(steps, part_run_steps(fraction, steps_per_epoch, cfg.steps_per_execution))
    return Workload("cifar_run", "images/s", steps * cfg.batch_size, 1,
                    partial(run_start, cfg=cfg, steps=steps, dataset=dataset), torch_run, fnlearn_run,
                    (("recipe_run", 1),), accuracy=True)


WORKLOADS = {w.name: w for w in (
    basic("regression", regression_start, batch=100, steps=500),
    basic("simple_net", simple_net_start, batch=64, steps=200),
    conv_train("cnn", "cnn", batch=64, steps=20, size=16),
    conv_train("fastnet_train", "fastnet", batch=512, steps=2),
    conv_train("resnet18_train", "resnet18", batch=128, steps=2),
    Workload("resnet18_infer", "images/s", 256, 2, partial(conv_start, model="resnet18"), torch_infer,
             fnlearn_infer, (("jit_apply", 1),)),
    Workload("yolo_infer", "images/s", 64, 2, partial(conv_start, model="yolo_tiny", size=128), torch_infer,
             fnlearn_infer, (("jit_apply", 1),)),
    fastnet_epoch(),
    cifar_run(),
)}
GROUPS = {"basics": ("regression", "simple_net")}
