"""Dynamic control flow under jit: how often Python branches and loops retrace, and lax's don't.

    python -m experiments.dynamic [--depths 1 2 3 4] [--n-steps 3 5 7]

Takes seconds on a 2-core CPU, mostly XLA compiling about 20 small programs. Runs
DynamicNet (shortcut or not), VariableDepthMLP (depths 1..4) and RecurrentNet (several
n_steps) under `jax.jit`, counting traces with a Python side effect inside the jitted
function (it runs only while JAX traces) and compiled programs with `_cache_size()`.
A Python bool or int retraces once per value (2 traces for the shortcut flag, 4 for 4
depths); `lax.cond` and `fori_loop` on a traced value compile once and give the same
outputs. RecurrentNet's n_steps sets the output shape, so every value needs its own
program either way; but `lax.scan` holds one copy of the cell (1 tanh in the program)
where a Python loop unrolls n_steps copies.
"""
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from fnlearn.models import DynamicNet, RecurrentNet, VariableDepthMLP

SEQUENCE_LENGTH = 10  # RecurrentNet's input sequence: n_steps can be at most this


def jit_counting_traces(fn, **jit_kwargs):
    """`jax.jit(fn)` plus a list whose length is the number of times fn was traced."""
    traces = []

    def traced(*args):
        traces.append(1)  # a Python side effect: runs while tracing, never when a program is reused
        return fn(*args)

    return jax.jit(traced, **jit_kwargs), traces


def unrolled_rnn(params, x, n_steps):
    """RecurrentNet's cell in a Python loop: the program holds one copy of the cell per step.

    Args:
      params: RecurrentNet's params (weight_ih, weight_hh, bias_ih, bias_hh).
      x: (B, T, features) inputs.
      n_steps: a Python int, steps to run.
    Returns:
      (B, n_steps, hidden) hidden states.
    """
    h = jnp.zeros((x.shape[0], params["weight_hh"].shape[0]), x.dtype)
    hs = []
    for t in range(n_steps):
        h = jnp.tanh(x[:, t] @ params["weight_ih"].T + params["bias_ih"]
                     + h @ params["weight_hh"].T + params["bias_hh"])
        hs.append(h)
    return jnp.stack(hs, 1)


def _run(fn, traces, calls):
    """Calls the jitted fn on each argument tuple; returns (outputs, row of counts)."""
    outputs = [fn(*args) for args in calls]
    return outputs, {"calls": len(calls), "traces": len(traces), "programs": fn._cache_size()}


def _check_equal(name, outputs, expected):
    for out, ref in zip(outputs, expected):
        if not np.allclose(out, ref, rtol=1e-5, atol=1e-6):
            raise ValueError(f"{name}: traced control flow gives a different output from the Python path")


def trace_counts(depths, n_steps_values, batch=4, seed=0):
    """Runs each model with Python and with lax control flow under jit and counts traces.

    Args:
      depths: VariableDepthMLP depths to call, in order.
      n_steps_values: RecurrentNet n_steps to call, in order (each <= SEQUENCE_LENGTH).
      batch: examples per call.
      seed: PRNG seed for params and inputs.
    Returns:
      dict row name -> {'calls', 'traces', 'programs'}; the RecurrentNet rows add 'tanh_ops',
      the tanh count in the program for the largest n_steps. Raises ValueError if a lax
      path's output differs from the Python path's.
    """
    key_init = jax.random.key(seed)
    rng = np.random.default_rng(seed)  # NumPy inputs: no extra programs to compile
    rows = {}

    net = DynamicNet()
    x = rng.standard_normal((batch, 10), dtype=np.float32)
    variables = jax.jit(net.init)(key_init, x)  # one program, not an eager op per param
    flags = [True, False, True, False]
    python_fn, traces = jit_counting_traces(net.apply, static_argnums=2)
    python_out, rows["DynamicNet, Python bool"] = _run(python_fn, traces, [(variables, x, f) for f in flags])
    cond_fn, traces = jit_counting_traces(net.apply)
    cond_out, rows["DynamicNet, lax.cond"] = _run(cond_fn, traces, [(variables, x, jnp.array(f)) for f in flags])
    _check_equal("DynamicNet", cond_out, python_out)

    mlp = VariableDepthMLP(hidden=16, out_features=2, max_depth=max(depths))
    variables = jax.jit(mlp.init)(key_init, x, 1)
    python_fn, traces = jit_counting_traces(mlp.apply, static_argnums=2)
    python_out, rows["VariableDepthMLP, Python int"] = _run(python_fn, traces, [(variables, x, d) for d in depths])
    loop_fn, traces = jit_counting_traces(mlp.apply)
    loop_out, rows["VariableDepthMLP, fori_loop"] = _run(loop_fn, traces,
                                                         [(variables, x, jnp.int32(d)) for d in depths])
    _check_equal("VariableDepthMLP", loop_out, python_out)

    rnn = RecurrentNet(hidden_size=8)
    seq = rng.standard_normal((batch, SEQUENCE_LENGTH, 5), dtype=np.float32)
    variables = jax.jit(rnn.init)(key_init, seq)
    longest = max(n_steps_values)
    scan_fn, traces = jit_counting_traces(rnn.apply, static_argnums=2)
    scan_out, rows["RecurrentNet, lax.scan"] = _run(scan_fn, traces, [(variables, seq, n) for n in n_steps_values])
    rows["RecurrentNet, lax.scan"]["tanh_ops"] = scan_fn.lower(variables, seq, longest).as_text().count("tanh")
    loop_fn, traces = jit_counting_traces(unrolled_rnn, static_argnums=2)
    loop_out, rows["RecurrentNet, Python loop"] = _run(loop_fn, traces,
                                                       [(variables["params"], seq, n) for n in n_steps_values])
    rows["RecurrentNet, Python loop"]["tanh_ops"] = loop_fn.lower(
        variables["params"], seq, longest).as_text().count("tanh")
    _check_equal("RecurrentNet", scan_out, loop_out)
    return rows


def main(argv=None):
    """Counts and prints traces per control-flow style.

    Args:
      argv: command-line arguments; None reads sys.argv.
    Returns:
      the `trace_counts` rows.
    """
    parser = cli.make_parser("dynamic", __doc__)
    parser.add_argument("--depths", type=cli.positive_int, nargs="+", default=[1, 2, 3, 4],
                        help="VariableDepthMLP hidden-layer counts to call, in order, each >= 1")
    parser.add_argument("--n-steps", type=cli.int_between(1, SEQUENCE_LENGTH), nargs="+", default=[3, 5, 7],
                        help=f"RecurrentNet steps to run, in order, each in 1..{SEQUENCE_LENGTH} (the sequence "
                             "length)")
    args = parser.parse_args(argv)

    rows = trace_counts(args.depths, args.n_steps)
    print(f"depths {args.depths}, n_steps {args.n_steps}; lax and Python paths give the same outputs")
    print(f"{'function, control flow':32s} {'calls':>5s} {'traces':>6s} {'programs':>8s} {'tanh ops':>8s}")
    for name, row in rows.items():
        print(f"{name:32s} {row['calls']:5d} {row['traces']:6d} {row['programs']:8d} {row.get('tanh_ops', ''):>8}")
    return rows


if __name__ == "__main__":
    main()
