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

from benchmarks.timing import PRECISIONS, Carried, Workload, compile_timed
from fnlearn import models
from fnlearn.recipes.cifar import CifarConfig, create_state, make_train_fn, sgd_rates
from fnlearn.train import TrainState, cross_entropy, make_optimizer, make_train_step, mse

# Both sides' losses: fnlearn's and the name of PyTorch's in torch.nn.functional.
LOSSES = {"mse": (mse, "mse_loss"), "cross_entropy": (cross_entropy, "cross_entropy")}
LR = 0.01  # every train workload's; momentum 0.9 (make_optimizer's default)
EPOCH_IMAGES = 50_000  # fastnet_epoch's training set: CIFAR-10's shape


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


def torch_mlp(torch, n_in, hidden, n_out):
    """Linear, ReLU, Linear (PyTorch's init)."""
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))


def mlp_start(torch, model, batches, widths, loss, optimizer):
    """A `Start` for a tutorial MLP; `batches` are stacked (n, batch, ...)."""
    variables = models.get(model).init(jax.random.key(0), batches[0][0])
    xs, ys = (torch.from_numpy(np.array(a)) for a in batches)  # np.array: a writable copy for torch
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
    """NHWC array -> NCHW torch tensor in channels_last memory format (the same bytes)."""
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def conv_start(torch, w, *, model, size=32):
    """A `Start` for a conv net on one random batch of `w.batch` (size, size, 3) images, Nesterov SGD."""
    from benchmarks import torch_models  # imports torch, which `main` loads only once it needs it

    kx, ky = jax.random.split(jax.random.key(0))
    x, y = jax.random.normal(kx, (w.batch, size, size, 3)), jax.random.randint(ky, (w.batch,), 0, 10)
    variables = jax.jit(models.get(model).init)(jax.random.key(0), x[:1])
    return Start(model, variables, (x[None], y[None]), partial(torch_models.twin, model, variables),
                 [(torch_images(torch, x), torch.from_numpy(np.array(y)).long())])


def torch_train_step(torch, net, opt, loss_fn, next_batch, bf16=False, after_step=None):
    """A `step()` running one PyTorch eager train step on `next_batch()`'s (x, y).

    Args:
      bf16: run the forward pass and loss under bf16 autocast.
      after_step: called with the step count after each optimizer step (e.g. lookahead).
    """
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    count = itertools.count(1)

    def step():
        x, y = next_batch()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if after_step:
            after_step(next(count))

    return step


def torch_train(torch, start, bf16):
    """PyTorch's `step()` for a `Start`: a train step on a fresh net and optimizer."""
    net = start.torch_net().train()
    params = [p for p in net.parameters() if p.requires_grad]
    if start.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=LR)
    else:
        opt = torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=start.optimizer == "nesterov")
    loss_fn = getattr(torch.nn.functional, LOSSES[start.loss][1])
    return torch_train_step(torch, net, opt, loss_fn, itertools.cycle(start.torch_batches).__next__, bf16)


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


def torch_infer(torch, start, bf16):
    """PyTorch's inference `step()` for a `Start` (BatchNorm from running statistics)."""
    net = start.torch_net().eval()
    images, _ = start.torch_batches[0]
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16)

    def step():
        with torch.inference_mode(), autocast():
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


def torch_epoch(torch, start, bf16):
    """PyTorch's recipe `step()`: airbench's work on tensors (gather, normalise, alternating
    flip, reflect-padded translate), the same net and optimizer groups, label smoothing and
    lookahead."""
    from benchmarks import torch_models

    cfg, steps_per_epoch = start.cfg, len(start.order)
    net = torch_models.twin("fastnet", start.variables).train()
    lr, decay = sgd_rates(cfg)
    opt = torch_models.airbench_optimizer(net, lr, cfg.momentum, decay, cfg.bias_lr_scale)
    images, labels = torch.from_numpy(start.images), torch.from_numpy(start.labels).long()
    flip_base = torch.rand(len(images)) < 0.5
    average = [v.clone() for v in net.state_dict().values() if v.is_floating_point()]
    batches = ((torch_models.airbench_batch(images, idx, flip_base, 0, cfg.translate), labels[idx])
               for idx in itertools.cycle(torch.from_numpy(start.order)))

    def lookahead(t):
        if t % cfg.lookahead_every == 0:
            torch_models.lookahead_(average, net, 0.95**5 * (t / steps_per_epoch) ** 3)

    loss_fn = partial(torch.nn.functional.cross_entropy, label_smoothing=cfg.label_smoothing)
    return torch_train_step(torch, net, opt, loss_fn, batches.__next__, bf16, lookahead)


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


def fastnet_epoch(fraction=0.08, batch=1024):
    """The CIFAR recipe's epoch, timing `fraction` of its steps: whole recipe calls, at least one."""
    k = CifarConfig().steps_per_execution
    steps = k * max(1, round(fraction * (EPOCH_IMAGES // batch) / k))
    return Workload("fastnet_epoch", "images/s", batch, steps, epoch_start, torch_epoch, fnlearn_epoch,
                    (("recipe_epoch", k),))


WORKLOADS = {w.name: w for w in (
    basic("regression", regression_start, batch=100, steps=500),
    basic("simple_net", simple_net_start, batch=64, steps=200),
    conv_train("cnn", "cnn", batch=64, steps=20, size=16),
    conv_train("fastnet_train", "fastnet", batch=512, steps=2),
    conv_train("resnet18_train", "resnet18", batch=128, steps=2),
    Workload("resnet18_infer", "images/s", 256, 2, partial(conv_start, model="resnet18"), torch_infer,
             fnlearn_infer, (("jit_apply", 1),)),
    fastnet_epoch(),
)}
GROUPS = {"basics": ("regression", "simple_net")}
