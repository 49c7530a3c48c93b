"""Tensors the JAX way: creation, math, broadcasting, NumPy interop, devices, matmul speed.

    python -m experiments.tensors [--size 2048] [--repeats 5]

Takes about ten seconds on a 2-core CPU: start-up, then each matmul timed after a
warm-up, compile time reported apart. Shows, by comparing buffer addresses, which
NumPy <-> JAX conversions share memory on the CPU: `np.asarray` and `np.from_dlpack` of
a JAX array do (the NumPy view is read-only); `jnp.asarray` of a NumPy array copies;
`jax.device_put` and `jax.dlpack.from_dlpack` of a NumPy array share it when its data is
64-byte aligned, so a later NumPy write shows through. Prints GFLOP/s of an N x N matmul
for NumPy and for JAX on each device, in float32 and in bfloat16 with float32
accumulation (`preferred_element_type`), and bfloat16's error against float32. On the
CPU, NumPy and JAX float32 run at about the same speed and bfloat16 is slower; the
measured figures are in docs/performance.md.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli


def creation_and_math():
    """A tour of array creation, arithmetic and broadcasting; returns the arrays made."""
    key = jax.random.key(0)
    made = {
        "zeros(2, 3)": jnp.zeros((2, 3)),
        "arange(6).reshape(2, 3)": jnp.arange(6.0).reshape(2, 3),
        "linspace(0, 1, 5)": jnp.linspace(0, 1, 5),
        "eye(3)": jnp.eye(3),
        "normal(key, (2, 3))": jax.random.normal(key, (2, 3)),  # randomness takes an explicit key
    }
    a = made["arange(6).reshape(2, 3)"]
    made["a * 2 + 1"] = a * 2 + 1
    made["a @ a.T"] = a @ a.T  # (2, 3) @ (3, 2) -> (2, 2)
    made["a.sum(axis=0)"] = a.sum(axis=0)
    # Broadcasting: trailing axes are matched, size-1 axes stretch: (3, 1) + (1, 4) -> (3, 4).
    made["(3,1) + (1,4)"] = jnp.arange(3.0)[:, None] + jnp.arange(4.0)[None, :]
    # JAX arrays are immutable: `.at[].set()` returns a new array instead of writing in place.
    made["a.at[0, 0].set(100)"] = a.at[0, 0].set(100.0)
    return made


def aligned_empty(n, alignment=64):
    """An uninitialized float32 NumPy array of n elements whose data starts on `alignment` bytes."""
    buffer = np.empty(n + alignment // 4, np.float32)
    offset = (-buffer.ctypes.data % alignment) // 4
    return buffer[offset:offset + n]


def numpy_interop(n=1024):
    """Which NumPy <-> JAX conversions share memory on the CPU, found by comparing buffer addresses.

    Args:
      n: elements in the arrays converted.
    Returns:
      dict conversion -> True if the result shares the source's buffer, plus
      'numpy write shows in jax array' (the aliasing hazard of a zero-copy import).
    """
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        source = jnp.arange(n, dtype=jnp.float32)
        default = np.arange(n, dtype=np.float32)
        aligned = aligned_empty(n)
        aligned[:] = default
    address = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    shared = {
        "np.asarray(jax array)": address(np.asarray(source)) == source.unsafe_buffer_pointer(),
        "np.from_dlpack(jax array)": address(np.from_dlpack(source)) == source.unsafe_buffer_pointer(),
        "jnp.asarray(numpy, 64-byte aligned)":
            jnp.asarray(aligned, device=cpu).unsafe_buffer_pointer() == address(aligned),
        # NumPy only promises 16-byte alignment, so whether this one is shared varies by run.
        f"jax.device_put(numpy, as allocated: address % 64 = {address(default) % 64})":
            jax.device_put(default, cpu).unsafe_buffer_pointer() == address(default),
        "jax.device_put(numpy, 64-byte aligned)":
            jax.device_put(aligned, cpu).unsafe_buffer_pointer() == address(aligned),
        "jax.dlpack.from_dlpack(numpy, 64-byte aligned)":
            jax.dlpack.from_dlpack(aligned).unsafe_buffer_pointer() == address(aligned),
    }
    imported = jax.device_put(aligned, cpu)
    aligned[0] = -1.0  # JAX assumes arrays never change; a shared buffer breaks that promise
    shared["numpy write shows in jax array"] = bool(imported[0] == -1.0)
    return shared


def placement():
    """Places a small array on each device and returns device -> the devices its result lives on."""
    out = {}
    for device in jax.devices():
        x = jax.device_put(jnp.arange(4.0), device)
        y = jax.jit(lambda v: v * 2)(x)  # computation follows its inputs' placement
        out[str(device)] = sorted(str(d) for d in y.devices())
    return out


def _gflops(fn, args, size, repeats):
    """GFLOP/s of `fn(*args)`, an N x N matmul, timed after a warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn(*args)
    jax.block_until_ready(result)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def matmul_benchmark(size, repeats):
    """GFLOP/s of an N x N matmul: NumPy float32, then JAX float32 and bf16 (f32 accumulation) per device.

    Returns:
      list of dicts: backend, device, dtype, gflops, compile_s (JAX only), and for bf16
      rel_error (max relative error against the float32 result).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    rows = [{"backend": "numpy", "device": "cpu", "dtype": "float32",
             "gflops": _gflops(np.matmul, (a, b), size, repeats)}]
    matmul_f32 = jax.jit(jnp.matmul)
    # bf16 inputs, float32 products and sums: the mixed-precision recipe for matmuls.
    matmul_bf16 = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    for device in jax.devices():
        x, y = jax.device_put(a, device), jax.device_put(b, device)
        xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
        for dtype, fn, args in (("float32", matmul_f32, (x, y)), ("bfloat16->f32", matmul_bf16, (xb, yb))):
            start = time.perf_counter()
            compiled = fn.lower(*args).compile()
            row = {"backend": "jax", "device": str(device), "dtype": dtype,
                   "compile_s": time.perf_counter() - start,
                   "gflops": _gflops(compiled, args, size, repeats)}
            if dtype != "float32":
                reference, result = matmul_f32(x, y), compiled(*args)
                row["out_dtype"] = str(result.dtype)
                row["rel_error"] = float(jnp.abs(result - reference).max() / jnp.abs(reference).max())
            rows.append(row)
    return rows


def main(argv=None):
    """Runs the tour and the benchmark and prints them.

    Args:
      argv: command-line arguments; None reads sys.argv.
    Returns:
      dict with 'arrays' (name -> shape), 'shared' (conversion -> zero-copy?),
      'placement' (device -> result devices) and 'matmul' (benchmark rows).
    """
    parser = cli.make_parser("tensors", __doc__)
    parser.add_argument("--size", type=cli.int_between(1, 16384), default=2048,
                        help="N of the N x N matmul, up to 16384 (each matrix takes 4 N^2 bytes, several at once)")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed matmuls per measurement")
    args = parser.parse_args(argv)

    print("== creation, math, broadcasting")
    arrays = creation_and_math()
    for name, value in arrays.items():
        print(f"{name:26s} {str(value.shape):8s} {np.array2string(np.asarray(value), precision=2)}"
              .replace("\n", " "))

    print("\n== NumPy interop on the CPU (shares memory = zero-copy)")
    shared = numpy_interop()
    for name, value in shared.items():
        print(f"{name:50s} {value}")

    print(f"\n== devices: {jax.devices()}  (default backend: {jax.default_backend()})")
    where = placement()
    for device, result_devices in where.items():
        print(f"array put on {device} -> jitted result on {result_devices}")

    print(f"\n== {args.size} x {args.size} matmul, {args.repeats} timed runs after a warm-up")
    rows = matmul_benchmark(args.size, args.repeats)
    for row in rows:
        extra = f"  compile {row['compile_s']:.2f} s" if "compile_s" in row else ""
        if "rel_error" in row:
            extra += f"  out {row['out_dtype']}, max rel. error vs f32 {row['rel_error']:.1e}"
        print(f"{row['backend']:6s} {row['device']:8s} {row['dtype']:14s} {row['gflops']:8.1f} GFLOP/s{extra}")
    return {"arrays": {k: tuple(v.shape) for k, v in arrays.items()}, "shared": shared,
            "placement": where, "matmul": rows}


if __name__ == "__main__":
    main()
