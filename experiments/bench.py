"""fnlearn against PyTorch, side by side in one process, on this machine.

    python -m experiments.bench                 # every workload
    python -m experiments.bench basics          # regression and simple_net
    python -m experiments.bench fastnet_train resnet18_infer --repeats 2 --json bench.json

Workloads (same shapes and random data on both sides; the conv nets start from the same weights):
  regression       the seed regression, full-batch Adam                       steps/s
  simple_net       SimpleNet 784-128-10, batch 64, SGD with momentum          steps/s
  cnn              the seed CNN (16x16x3), train step, batch 64               images/s
  fastnet_train    airbench94's net, train step, batch 512, Nesterov SGD      images/s
  resnet18_train   ResNet-18 (CIFAR stem), train step, batch 128              images/s
  resnet18_infer   ResNet-18 (CIFAR stem), inference, batch 256               images/s
  fastnet_epoch    the fast CIFAR recipe on 50,000 random uint8 32x32 images
                   at batch 1024: gather, flip, translate and normalise, step,
                   lookahead. `--epoch-fraction` of its 48 steps is timed
                   (default 0.08: 4 steps; 1.0 for the whole epoch)           images/s

How it times: each side is warmed up first (compilation for fnlearn, kernel
selection for PyTorch), then the best of `--repeats` runs of a few steps counts
(basics: PyTorch's whole run, and fnlearn's steps or compiled runs for about
0.1 s; cnn: 20 steps; the big nets: 2 steps, each of which takes seconds on a
CPU; fastnet_epoch: the epoch fraction). The runs of a workload's sides take
turns (PyTorch, fnlearn, PyTorch, ...), so a slow spell of a shared machine hits
both sides, not one. Compile time is reported apart and never counted.

PyTorch runs eagerly in its best CPU mode: the basics in float32; the conv
workloads in float32 channels_last or in bf16 autocast (channels_last), whichever
is faster on a one-step probe (`torch_mode`). fnlearn runs the conv workloads in
float32 and in bfloat16 (the model built with dtype=bfloat16, params float32),
each row against that one PyTorch number. fnlearn's train steps run as jitted
steps, one a call, and as a compiled run: `lax.scan` over every step of the
basics, or over the conv nets' timed steps, as the CIFAR recipe's
`steps_per_execution` does. ratio = fnlearn_per_s / torch_per_s.
Both sides do a tutorial loop's work: forward, loss, gradients, update. fnlearn's
train step leaves out its grad-norm metric (`make_train_step(grad_norm=False)`),
which PyTorch's loop does not compute either; it keeps its accuracy metric.

Run it on an idle machine: anything else heavy running skews the ratio (PyTorch's
threads suffer most: simple_net's PyTorch rate swung 20x on a busy machine).
`basics` takes about a minute on a 2-core CPU; the whole bench took 503 s there, idle.
`python -m experiments.profile` splits the conv train steps by kind of work.
"""
import contextlib
import dataclasses
import itertools
import json
import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments import cli
from fnlearn import models
from fnlearn.models import RegressionNet, SimpleNet
from fnlearn.train import TrainState, cross_entropy, make_optimizer, make_train_step, mse

PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# PyTorch's CPU modes for conv nets, by whether they run under bf16 autocast.
TORCH_MODES = {"fp32_channels_last": False, "bf16_autocast_channels_last": True}


def elapsed(fn):
    """Wall-clock seconds of one call of `fn` (which must block until done)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_run(step, steps, warmup_steps=1):
    """Warms `step` up with `warmup_steps` calls; returns `run()`, which makes `steps` calls and waits for them.

    Args:
      step: runs one step; may return JAX arrays, which `run` waits for.
    """
    def run(n=steps):
        out = None
        for _ in range(n):
            out = step()
        jax.block_until_ready(out)  # JAX dispatches asynchronously; torch has already finished

    run(warmup_steps)
    return run


def run_lasting(step, items_per_call, seconds=0.1):
    """`(run, items)` as `best_rates` takes: `run()` makes enough calls of `step()` to last about `seconds`.

    A compiled run of the seed regression takes 3 ms: timed alone, one slow
    millisecond of a shared machine would swing its ratio by a third.
    """
    one_call = timed_run(step, 1)  # warmed up by one call
    calls = max(1, math.ceil(seconds / elapsed(one_call)))
    return timed_run(step, calls, warmup_steps=0), calls * items_per_call


def best_rates(runs, repeats):
    """Items per second of each run: the best of `repeats` rounds, each round timing every run once, in turn.

    Args:
      runs: list of `(run, items)`: `run()` blocks until done and handles `items` items.
    Returns:
      a list of items per second, in the order of `runs`.
    """
    times = [[elapsed(run) for run, _ in runs] for _ in range(repeats)]
    return [items / min(t[i] for t in times) for i, (_, items) in enumerate(runs)]


def compile_timed(fn, *example, donate=True):
    """`fn` jitted (its first argument donated) and compiled for `example`; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*example).compile()
    return compiled, time.perf_counter() - t0


def carried(compiled_step, state, batches):
    """A `step()` that applies `compiled_step(state, batch)` to the carried state and the next batch.

    `state` is donated by the first step, so pass a copy if it is needed afterwards.
    """
    holder = [state]
    batch_iter = itertools.cycle(batches)

    def step():
        holder[0], metrics = compiled_step(holder[0], next(batch_iter))
        return holder[0], metrics

    step.compiled = compiled_step  # for experiments.profile, which reads its HLO
    return step


def row(workload, mode, precision, unit, torch_per_s, torch_mode, fnlearn_per_s, compile_s):
    """One line of the table (the JSON row format)."""
    return {"workload": workload, "mode": mode, "precision": precision, "unit": unit,
            "torch_per_s": torch_per_s, "torch_mode": torch_mode, "fnlearn_per_s": fnlearn_per_s,
            "ratio": fnlearn_per_s / torch_per_s, "compile_s": compile_s}


def fnlearn_rows(name, state, batches, loss_fn, repeats, torch_run):
    """Times PyTorch's run, the jitted step and the compiled run over `batches` (stacked, (N, ...)); returns rows.

    Args:
      torch_run: `(run, steps)` from `torch_steps`.
    """
    train_step = make_train_step(loss_fn, grad_norm=False)
    steps = jax.tree.leaves(batches)[0].shape[0]
    batch_list = [jax.tree.map(lambda b, i=i: b[i], batches) for i in range(steps)]
    step_c, step_compile = compile_timed(train_step, state, batch_list[0])
    step_run = run_lasting(carried(step_c, jax.tree.map(jnp.copy, state), batch_list), 1)
    scan_c, scan_compile = compile_timed(lambda s, bs: lax.scan(train_step, s, bs), state, batches)
    scan_run = run_lasting(carried(scan_c, jax.tree.map(jnp.copy, state), [batches]), steps)
    torch_per_s, step_rate, scan_rate = best_rates([torch_run, step_run, scan_run], repeats)
    return [row(name, mode, "fp32", "steps/s", torch_per_s, "fp32_eager", rate, compile_s)
            for mode, rate, compile_s in (("jit_step", step_rate, step_compile),
                                          ("compiled_run", scan_rate, scan_compile))]


def torch_train_step(torch, model, opt, loss_fn, next_batch, bf16=False, after_step=None):
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
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if after_step:
            after_step(next(count))

    return step


def torch_steps(torch, model, batches, loss_fn, make_opt):
    """`(run, steps)`: `run()` makes PyTorch eager train steps over each of the same batches once (warmed up)."""
    xs, ys = (torch.from_numpy(np.array(a)) for a in batches)  # np.array: a writable copy for torch
    if not ys.is_floating_point():
        ys = ys.long()  # torch's cross_entropy takes int64 class ids
    step = torch_train_step(torch, model, make_opt(model.parameters()), loss_fn,
                            itertools.cycle(zip(xs, ys)).__next__)
    return timed_run(step, len(xs), warmup_steps=len(xs)), len(xs)


def regression(torch, args, steps=500):
    """The seed regression: 1-20-1, 100 points, full-batch Adam lr 0.01."""
    x = jnp.linspace(-1, 1, 100)[:, None]
    y = x**2
    model = RegressionNet()
    state = TrainState.create(apply_fn=model.apply, variables=model.init(jax.random.key(0), x),
                              tx=make_optimizer("adam", 0.01))
    batches = (jnp.broadcast_to(x, (steps, *x.shape)), jnp.broadcast_to(y, (steps, *y.shape)))
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))
    ref = torch_steps(torch, net, batches, torch.nn.functional.mse_loss, lambda p: torch.optim.Adam(p, lr=0.01))
    return fnlearn_rows("regression", state, batches, mse, args.repeats, ref)


def simple_net(torch, args, steps=200, batch=64):
    """SimpleNet (784-128-10) on MNIST-shaped random data, batch 64, SGD with momentum."""
    kx, ky = jax.random.split(jax.random.key(0))
    batches = (jax.random.normal(kx, (steps, batch, 784)), jax.random.randint(ky, (steps, batch), 0, 10))
    model = SimpleNet()
    state = TrainState.create(apply_fn=model.apply, variables=model.init(jax.random.key(0), batches[0][0]),
                              tx=make_optimizer("momentum", 0.01))
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ref = torch_steps(torch, net, batches, torch.nn.functional.cross_entropy,
                      lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    return fnlearn_rows("simple_net", state, batches, cross_entropy, args.repeats, ref)


def torch_net(torch, net_cls, state_dict):
    """`net_cls()` holding `state_dict` (what it lacks keeps torch's init), in channels_last memory format."""
    net = net_cls()
    net.load_state_dict(state_dict, strict=False)
    return net.to(memory_format=torch.channels_last)


def torch_images(torch, x):
    """NHWC array -> NCHW torch tensor in channels_last memory format (the same bytes)."""
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def torch_best(make_step):
    """PyTorch's faster mode on a workload: `(step(), the TORCH_MODES name)`.

    Each of `TORCH_MODES` is warmed up and timed over one step; only the faster is
    then measured, so the slower one costs two steps, not a whole measurement (on
    this CPU bf16 autocast is 3x slower for one net and faster for another, so
    neither can be assumed).

    Args:
      make_step: `make_step(bf16) -> step()` on a fresh model.
    """
    probes = {}
    for mode, bf16 in TORCH_MODES.items():
        step = make_step(bf16)
        step()  # warm-up: oneDNN builds its kernels on the first call
        probes[mode] = elapsed(step), step
    best = min(probes, key=lambda mode: probes[mode][0])
    return probes[best][1], best


def precision_rows(name, items_per_step, steps, repeats, make_torch_step, builds):
    """PyTorch's best mode against each fnlearn mode in float32 and bfloat16, timed in turn; returns rows.

    Args:
      make_torch_step: for `torch_best`.
      builds: `(mode, steps_per_call, build)` per fnlearn mode, where `build(precision,
        dtype) -> (step(), compile seconds)` and one call of `step()` makes
        `steps_per_call` steps (`steps` must be a multiple of it). Every row is
        against the one PyTorch measurement.
      steps, repeats: steps per timed run, and rounds of runs (the best counts).
    """
    torch_step, torch_mode = torch_best(make_torch_step)
    runs, labels = [(timed_run(torch_step, steps, warmup_steps=0), steps * items_per_step)], []
    for mode, steps_per_call, build in builds:
        for precision, dtype in PRECISIONS.items():
            step, seconds = build(precision, dtype)
            runs.append((timed_run(step, steps // steps_per_call), steps * items_per_step))
            labels.append((mode, precision, seconds))
    torch_per_s, *rates = best_rates(runs, repeats)
    return [row(name, mode, precision, "images/s", torch_per_s, torch_mode, per_s, seconds)
            for (mode, precision, seconds), per_s in zip(labels, rates)]


def random_batch(batch, size):
    """(batch, size, size, 3) normal images and (batch,) int32 labels in [0, 10)."""
    kx, ky = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (batch, size, size, 3)), jax.random.randint(ky, (batch,), 0, 10)


def train_steps(torch, model_name, net_cls, batch, size=32, to_torch=None):
    """Step factories for a conv net's train step (cross-entropy, Nesterov SGD) on both sides.

    Both sides start from the same weights: `to_torch(variables)` (default
    `torch_models.torch_state_dict`) loads fnlearn's into `net_cls()`.

    Returns:
      (torch_step(bf16) -> step(), fnlearn_step(precision, dtype) -> (step(), compile seconds)),
      each building a fresh model and optimizer on one fixed random batch.
    """
    from experiments import torch_models  # imports torch, which `main` loads only once it needs it

    x, y = random_batch(batch, size)
    variables = jax.jit(models.get(model_name).init)(jax.random.key(0), x[:1])
    state_dict = (to_torch or torch_models.torch_state_dict)(variables)

    def torch_step(bf16):
        net = torch_net(torch, net_cls, state_dict).train()
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                              nesterov=True)
        batches = itertools.repeat((torch_images(torch, x), torch.from_numpy(np.array(y)).long()))
        return torch_train_step(torch, net, opt, torch.nn.functional.cross_entropy, batches.__next__, bf16)

    def fnlearn_step(precision, dtype, steps_per_call=1):
        """One jitted step per call, or `steps_per_call` steps in one `lax.scan` (a compiled run)."""
        model = models.get(model_name, dtype=dtype)
        state = TrainState.create(apply_fn=model.apply, variables=jax.tree.map(jnp.copy, variables),
                                  tx=make_optimizer("nesterov", 0.01, momentum=0.9))
        train_step = make_train_step(grad_norm=False)
        if steps_per_call == 1:
            step_c, compile_s = compile_timed(train_step, state, (x, y))
            return carried(step_c, state, [(x, y)]), compile_s
        batches = jax.tree.map(lambda a: jnp.stack([a] * steps_per_call), (x, y))
        scan_c, compile_s = compile_timed(lambda s, bs: lax.scan(train_step, s, bs), state, batches)
        return carried(scan_c, state, [batches]), compile_s

    return torch_step, fnlearn_step


def train_rows(torch, args, name, model_name, net_cls, batch, steps, size=32, to_torch=None):
    """A conv net's train step (see `train_steps`) timed on both sides, as jitted steps and as
    a compiled run of `steps` steps in one `lax.scan`; returns rows."""
    torch_step, fnlearn_step = train_steps(torch, model_name, net_cls, batch, size, to_torch)
    builds = [(mode, k, partial(fnlearn_step, steps_per_call=k))
              for mode, k in (("jit_step", 1), ("compiled_run", steps))]
    return precision_rows(name, batch, steps, args.repeats, torch_step, builds)


def cnn(torch, args):
    """The seed CNN (conv 3->16, ReLU, Linear 16*14*14->10) on 16x16x3 images, batch 64."""
    from experiments.torch_models import TorchCNN, cnn_state_dict
    return train_rows(torch, args, "cnn", "cnn", TorchCNN, batch=64, steps=20, size=16,
                      to_torch=cnn_state_dict)


def fastnet_train(torch, args):
    """airbench94's net, one train step at batch 512."""
    from experiments.torch_models import TorchFastNet
    return train_rows(torch, args, "fastnet_train", "fastnet", TorchFastNet, batch=512, steps=2)


def resnet18_train(torch, args):
    """ResNet-18 with the CIFAR stem, one train step at batch 128."""
    from experiments.torch_models import TorchResNet
    return train_rows(torch, args, "resnet18_train", "resnet18", TorchResNet, batch=128, steps=2)


def resnet18_infer(torch, args, batch=256, steps=2):
    """ResNet-18 with the CIFAR stem, inference (BatchNorm from running statistics) at batch 256."""
    from experiments import torch_models

    x, _ = random_batch(batch, 32)
    variables = jax.jit(models.get("resnet18").init)(jax.random.key(0), x[:1])

    def torch_step(bf16):
        net = torch_net(torch, torch_models.TorchResNet, torch_models.torch_state_dict(variables)).eval()
        images = torch_images(torch, x)
        autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16)

        def step():
            with torch.inference_mode(), autocast():
                net(images)
        return step

    def fnlearn_step(precision, dtype):
        model = models.get("resnet18", dtype=dtype)
        predict, compile_s = compile_timed(partial(model.apply, train=False), variables, x, donate=False)
        return partial(predict, variables, x), compile_s

    return precision_rows("resnet18_infer", batch, steps, args.repeats, torch_step,
                          [("jit_apply", 1, fnlearn_step)])


def fastnet_epoch(torch, args, n_images=50_000, batch=1024):
    """The fast CIFAR recipe's epoch (its `--epoch-fraction`): augmentation on the device, step, lookahead.

    fnlearn runs `fnlearn.recipes.cifar.make_train_fn` as the recipe does; PyTorch does
    airbench's work on tensors: gather, normalise, alternating flip, reflect-padded
    translate, the same net and optimizer groups, label smoothing and lookahead.
    """
    from experiments import torch_models
    from fnlearn.data import Dataset
    from fnlearn.recipes.cifar import CifarConfig, build_state, make_cifar_optimizer, make_train_fn

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)  # CIFAR-10's training set shape
    labels = rng.integers(0, 10, n_images).astype(np.int32)
    dataset = Dataset(images, labels, images[:0], labels[:0], tuple(map(str, range(10))), "random")
    cfg = CifarConfig(batch_size=batch)
    steps_per_epoch, k = n_images // batch, cfg.steps_per_execution
    steps = k * max(1, round(args.epoch_fraction * steps_per_epoch / k))  # a whole number of the recipe's calls
    order = rng.permutation(n_images)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
    _, variables = build_state(cfg, dataset, jax.random.key(0))

    def torch_step(bf16):
        net = torch_net(torch, torch_models.TorchFastNet, torch_models.torch_state_dict(variables)).train()
        # make_cifar_optimizer's conversion of airbench's units, for the mean loss.
        lr = cfg.lr * batch / (1024 * (1 + 1 / (1 - cfg.momentum)))
        opt = torch_models.airbench_optimizer(net, lr, cfg.momentum, cfg.weight_decay / cfg.lr,
                                              cfg.bias_lr_scale)
        images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels).long()
        flip_base = torch.rand(n_images) < 0.5
        average = [v.clone() for v in net.state_dict().values() if v.is_floating_point()]
        batches = ((torch_models.airbench_batch(images_t, idx, flip_base, 0, cfg.translate), labels_t[idx])
                   for idx in itertools.cycle(torch.from_numpy(order)))

        def lookahead(t):
            if t % cfg.lookahead_every == 0:
                torch_models.lookahead_(average, net, 0.95**5 * (t / steps_per_epoch) ** 3)

        loss_fn = partial(torch.nn.functional.cross_entropy, label_smoothing=cfg.label_smoothing)
        return torch_train_step(torch, net, opt, loss_fn, batches.__next__, bf16, lookahead)

    device_images, device_labels = jnp.asarray(images), jnp.asarray(labels)

    def fnlearn_step(precision, dtype):
        run_cfg = dataclasses.replace(cfg, precision=precision)
        model, variables = build_state(run_cfg, dataset, jax.random.key(0))
        tx = make_cifar_optimizer(run_cfg, variables["params"], steps_per_epoch, steps_per_epoch)
        state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)
        state = state.replace(ema_params=jax.tree.map(jnp.copy, state.variables))
        train = make_train_fn(run_cfg, device_images, device_labels, steps_per_epoch)
        # (indices of k steps, epoch), as the recipe calls it
        batches = [(jnp.asarray(order[i:i + k], jnp.int32), jnp.int32(0))
                   for i in range(0, steps_per_epoch - k + 1, k)]
        step_c, compile_s = compile_timed(lambda s, b: train(s, *b), state, batches[0])
        return carried(step_c, state, batches), compile_s

    return precision_rows("fastnet_epoch", batch, steps, args.repeats, torch_step,
                          [("recipe_epoch", k, fnlearn_step)])


WORKLOADS = {"regression": regression, "simple_net": simple_net, "cnn": cnn, "fastnet_train": fastnet_train,
             "resnet18_train": resnet18_train, "resnet18_infer": resnet18_infer, "fastnet_epoch": fastnet_epoch}
GROUPS = {"basics": ("regression", "simple_net")}


def print_table(rows):
    """The rows as a fixed-width table; throughputs are per second in each row's unit."""
    head = (f"{'workload':<16}{'mode':<14}{'prec':<6}{'unit':<10}{'torch/s':>11}  {'torch mode':<29}"
            f"{'fnlearn/s':>11}{'ratio':>8}{'compile s':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workload']:<16}{r['mode']:<14}{r['precision']:<6}{r['unit']:<10}{r['torch_per_s']:>11.1f}  "
              f"{r['torch_mode']:<29}{r['fnlearn_per_s']:>11.1f}{r['ratio']:>7.2f}x{r['compile_s']:>11.2f}")


def main(argv=None):
    parser = cli.make_parser("bench", __doc__)
    parser.add_argument("names", nargs="*", metavar="name", help="workloads or groups: "
                        f"{', '.join([*WORKLOADS, *GROUPS])}; none given: every workload")
    parser.add_argument("--json", help="also write the rows to this JSON file (if left out: only the table)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timed runs per measurement; the best counts")
    parser.add_argument("--epoch-fraction", type=cli.fraction, default=0.08,
                        help="fraction in (0, 1] of fastnet_epoch's 48 steps to time, "
                             "rounded to whole recipe calls, at least one")
    args = parser.parse_args(argv)
    # Checked now, not after a run of minutes: the rows are written at the very end.
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
        parser.error(f"--json {args.json}: pass a file path in an existing folder")
    names = []
    for n in args.names or list(WORKLOADS):
        if n not in WORKLOADS and n not in GROUPS:
            parser.error(f"unknown workload {n!r}; choose from {', '.join([*WORKLOADS, *GROUPS])}")
        names.extend(GROUPS.get(n, (n,)))
    import torch

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    rows = []
    t_start = time.perf_counter()
    for name in dict.fromkeys(names):
        t0 = time.perf_counter()
        rows.extend(WORKLOADS[name](torch, args))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"all workloads: {time.perf_counter() - t_start:.0f} s\n")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
