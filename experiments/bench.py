"""fnlearn against PyTorch, side by side in one process, on this machine.

    python -m experiments.bench                 # every workload
    python -m experiments.bench basics          # regression and simple_net
    python -m experiments.bench simple_net --json bench.json

For each workload it times PyTorch eager (its best CPU mode) and fnlearn's jitted
step and compiled run on the same shapes, after a warm-up, best of `--repeats`,
and prints throughput and the ratio fnlearn/PyTorch. Compile time is reported
apart and never counted. Run it on an idle machine: anything else heavy running
skews the ratio. `basics` takes about a minute on a 2-core CPU.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fnlearn.models import RegressionNet, SimpleNet
from fnlearn.train import TrainState, cross_entropy, make_optimizer, make_train_step, mse


def best_time(fn, repeats):
    """Best wall-clock of `repeats` calls of `fn` (which must block until done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fnlearn_rows(name, state, batches, loss_fn, items_per_step, repeats, torch_per_s):
    """Times the jitted step and the compiled run over `batches` (stacked, (N, ...)); returns rows."""
    train_step = make_train_step(loss_fn)
    steps = jax.tree.leaves(batches)[0].shape[0]
    step = jax.jit(train_step, donate_argnums=0)
    t0 = time.perf_counter()
    step_c = step.lower(state, jax.tree.map(lambda b: b[0], batches)).compile()
    step_compile = time.perf_counter() - t0
    batch_list = [jax.tree.map(lambda b, i=i: b[i], batches) for i in range(steps)]
    holder = [jax.tree.map(jnp.copy, state)]

    def run_steps():
        s = holder[0]
        for b in batch_list:
            s, m = step_c(s, b)
        jax.block_until_ready(s)
        holder[0] = s

    run_steps()
    step_s = best_time(run_steps, repeats)

    scan = jax.jit(lambda s, bs: lax.scan(train_step, s, bs), donate_argnums=0)
    t0 = time.perf_counter()
    scan_c = scan.lower(state, batches).compile()
    scan_compile = time.perf_counter() - t0
    holder[0] = jax.tree.map(jnp.copy, state)

    def run_scan():
        holder[0] = jax.block_until_ready(scan_c(holder[0], batches)[0])

    run_scan()
    scan_s = best_time(run_scan, repeats)
    rows = []
    for mode, seconds, compile_s in (("jit_step", step_s, step_compile), ("compiled_run", scan_s, scan_compile)):
        per_s = steps * items_per_step / seconds
        rows.append({"workload": name, "mode": mode, "precision": "fp32", "torch_per_s": torch_per_s,
                     "fnlearn_per_s": per_s, "ratio": per_s / torch_per_s, "compile_s": compile_s})
    return rows


def torch_per_s(torch, model, batches, loss_fn, make_opt, items_per_step, repeats):
    """PyTorch eager train steps per second (times items_per_step) over the same batches."""
    opt = make_opt(model.parameters())
    xs, ys = (torch.from_numpy(np.asarray(a)) for a in batches)
    if not ys.is_floating_point():
        ys = ys.long()  # torch's cross_entropy takes int64 class ids

    def run():
        for x, y in zip(xs, ys):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    run()
    return xs.shape[0] * items_per_step / best_time(run, repeats)


def regression(torch, repeats, steps=500):
    """The seed regression: 1-20-1, 100 points, full-batch Adam lr 0.01."""
    x = jnp.linspace(-1, 1, 100)[:, None]
    y = x**2
    model = RegressionNet()
    state = TrainState.create(apply_fn=model.apply, variables=model.init(jax.random.key(0), x),
                              tx=make_optimizer("adam", 0.01))
    batches = (jnp.broadcast_to(x, (steps, *x.shape)), jnp.broadcast_to(y, (steps, *y.shape)))
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))
    ref = torch_per_s(torch, net, batches, torch.nn.functional.mse_loss,
                      lambda p: torch.optim.Adam(p, lr=0.01), 1, repeats)
    return fnlearn_rows("regression", state, batches, mse, 1, repeats, ref)


def simple_net(torch, repeats, steps=200, batch=64):
    """SimpleNet (784-128-10) on MNIST-shaped random data, batch 64, SGD with momentum."""
    kx, ky = jax.random.split(jax.random.key(0))
    batches = (jax.random.normal(kx, (steps, batch, 784)), jax.random.randint(ky, (steps, batch), 0, 10))
    model = SimpleNet()
    state = TrainState.create(apply_fn=model.apply, variables=model.init(jax.random.key(0), batches[0][0]),
                              tx=make_optimizer("momentum", 0.01))
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ref = torch_per_s(torch, net, batches, torch.nn.functional.cross_entropy,
                      lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), 1, repeats)
    return fnlearn_rows("simple_net", state, batches, cross_entropy, 1, repeats, ref)


WORKLOADS = {"regression": regression, "simple_net": simple_net}
GROUPS = {"basics": ("regression", "simple_net")}


def print_table(rows):
    head = f"{'workload':<16}{'mode':<14}{'prec':<6}{'torch/s':>12}{'fnlearn/s':>12}{'ratio':>8}{'compile s':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workload']:<16}{r['mode']:<14}{r['precision']:<6}{r['torch_per_s']:>12.1f}"
              f"{r['fnlearn_per_s']:>12.1f}{r['ratio']:>7.2f}x{r['compile_s']:>11.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"workloads or groups: {', '.join([*WORKLOADS, *GROUPS])}")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    names = []
    for n in args.names or list(WORKLOADS):
        if n not in WORKLOADS and n not in GROUPS:
            parser.error(f"unknown workload {n!r}; choose from {', '.join([*WORKLOADS, *GROUPS])}")
        names.extend(GROUPS.get(n, (n,)))
    import torch

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    rows = []
    for name in dict.fromkeys(names):
        rows.extend(WORKLOADS[name](torch, args.repeats))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
