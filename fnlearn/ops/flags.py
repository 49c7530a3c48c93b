"""XLA:CPU settings fnlearn applies before JAX starts, each kept only because it measurably helps.

`apply()` adds them to the `XLA_FLAGS` environment variable, which XLA reads once,
when the first JAX computation creates the backend; `import fnlearn` calls it, so
import fnlearn before running any JAX code. A flag the user already set in
`XLA_FLAGS` is left as the user set it. They are `xla_cpu_*` flags: other backends
ignore them.

Each was chosen by compiling variants with `jax.jit(..., compiler_options=...)` and
timing them interleaved in one process (figures: docs/performance.md):

- kept: YNNPACK convolutions off (XLA:CPU's default hands convolutions to YNNPACK).
  XLA's Eigen convolution is faster on every CIFAR-size layer measured, most of all
  for kernel gradients, so conv nets' train steps are faster.
- kept: YNNPACK dots off too. The FastNet step does not change, but small-matmul
  steps (SimpleNet, 784-128-10) are faster.
- not kept, no gain on the FastNet step: `xla_cpu_prefer_vector_width=512`,
  `xla_cpu_enable_fast_math`, and glibc `mallopt` keeping freed memory mapped.
- not kept, slower: YNNPACK for elementwise fusions, XLA's loops instead of YNNPACK
  for reductions. oneDNN (`xla_cpu_use_onednn`) is not wired into this jaxlib's CPU
  pipeline: its flags change nothing.
"""
import importlib.metadata
import os

# Flag name -> value. The "-" removes one entry from XLA's default list of YNNPACK
# fusion types (dots, convolutions, reductions), keeping the others.
CPU_FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution,-individual_dot",
}
# The jaxlib releases they were measured on. XLA aborts on a flag it does not know, and an
# experimental flag may go in any release, so on others fnlearn sets none.
MEASURED_ON = ("0.10.",)


def xla_flags(existing="", jaxlib=None):
    """Returns an XLA_FLAGS string: `existing`, then each fnlearn flag it does not set.

    Args:
      existing: the current XLA_FLAGS value (space-separated `--name=value` items).
      jaxlib: the jaxlib version (default: the installed one's); none are added unless it
        starts with one of `MEASURED_ON`.
    Returns:
      the combined value; the user's own setting of a flag always wins.
    """
    if jaxlib is None:
        try:
            jaxlib = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:  # a source build on the path: no version to trust
            jaxlib = ""
    items = existing.split()
    if not jaxlib.startswith(MEASURED_ON):
        return " ".join(items)
    names = {item.lstrip("-").split("=", 1)[0] for item in items}
    items += [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in names]
    return " ".join(items)


def apply(environ=None):
    """Sets `XLA_FLAGS` in `environ` (default `os.environ`) to `xla_flags(current value)`.

    Has no effect on a backend that already exists: call it before the first JAX computation.
    """
    environ = os.environ if environ is None else environ
    environ["XLA_FLAGS"] = xla_flags(environ.get("XLA_FLAGS", ""))
