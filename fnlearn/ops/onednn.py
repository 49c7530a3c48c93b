"""Channels-last 2-D convolutions that XLA:CPU runs in oneDNN, through XLA's FFI.

XLA:CPU runs convolutions in Eigen, which is slower than oneDNN (what PyTorch's CPU
convolutions run in) on most layers, and runs bfloat16 ones in float32. The library
built from `_onednn/` at install runs the three directions of a convolution in oneDNN
(and batch normalisation, `fnlearn.ops.batch_norm`); this module loads it and makes the
convolutions JAX primitives:

- `conv(x, kernel)`: NHWC x, HWIO kernel, explicit padding;
- `input_grad(dy, kernel)` and `kernel_grad(x, dy)`: its two gradients.

Each is bilinear, and each one's transposes are two of the others, so `jax.grad`,
`jax.jvp` and any order of derivative stay in these three primitives. `vmap` folds a
mapped batch axis into the batch, and otherwise maps lax's convolution. CPU lowers
them to the FFI calls; every other platform to lax's convolutions, so a program
traced on a CPU host still lowers for a GPU.

oneDNN's kernel gradient sums its N x OH x OW products per weight in float32, as PyTorch's
CPU one does (the same library), so its rounding error grows with the batch, faster than
XLA's (docs/performance.md); training is not affected.

The library runs one oneDNN call at a time in the process: each runs on every core
(oneDNN's OpenMP team), while XLA:CPU runs independent ops, such as a convolution's two
gradients, side by side on its own threads. Queued, ResNet-18's fp32 train step ran faster
(docs/performance.md).

The library is loaded at the first convolution. Where it or oneDNN is missing,
`enabled()` is False, fnlearn says so once, and convolutions and batch norms keep XLA's
lowering; `FNLEARN_ONEDNN=0` turns this path off, and `disabled()` turns it off while
tracing programs that leave the process (`jax.export`, ONNX) or whose cost XLA must count.
"""
import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

ENV = "FNLEARN_ONEDNN"
_LIBRARY = pathlib.Path(__file__).with_name("_onednn") / "libfnlearn_onednn.so"
# FFI target names and the library's handler symbols.
_TARGETS = {"fnlearn_conv_forward": "FnlearnConvForward", "fnlearn_conv_input_grad": "FnlearnConvInputGrad",
            "fnlearn_conv_kernel_grad": "FnlearnConvKernelGrad",
            "fnlearn_batch_norm_forward": "FnlearnBatchNormForward",
            "fnlearn_batch_norm_backward": "FnlearnBatchNormBackward"}


def _libdnnl():
    """Path of libdnnl.so.3 from the onednn-cpu-gomp wheel, or None."""
    try:
        files = importlib.metadata.distribution("onednn-cpu-gomp").files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((f.locate() for f in files if f.name == "libdnnl.so.3"), None)


def _stale(library):
    """Why `library` was not built from the sources beside it (a source tree after a pull), or None
    (also where no source lies beside it: nothing to compare). The hash is setup.py's."""
    sources = sorted(p for p in _LIBRARY.parent.iterdir() if p.suffix in (".cc", ".h"))
    if not sources:
        return None
    built = getattr(library, "FnlearnOnednnSource", None)
    if built is not None:
        built.restype = ctypes.c_char_p
        if built().decode() == hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]:
            return None
    return (f"{_LIBRARY.name} was built from other sources than {_LIBRARY.parent.name}/'s (reinstall fnlearn: "
            "pip install -e . in its source tree)")


@functools.cache
def _load():
    """(True, {op: whether oneDNN runs it in bf16 here}) once the FFI targets are registered,
    else (False, why)."""
    if not _LIBRARY.exists():
        return False, f"{_LIBRARY.name} was not built (reinstall fnlearn with a C++17 compiler)"
    dnnl = _libdnnl()
    if dnnl is None:
        return False, "oneDNN is not installed (pip install onednn-cpu-gomp)"
    try:
        # Loaded first: the library's own reference to libdnnl.so.3 then resolves to it.
        ctypes.CDLL(str(dnnl))
        library = ctypes.CDLL(str(_LIBRARY))
        if (stale := _stale(library)) is not None:
            return False, stale
        handlers = {name: getattr(library, symbol) for name, symbol in _TARGETS.items()}
        native_bf16 = {"conv": bool(library.FnlearnConvNativeBf16()),
                       "batch_norm": bool(library.FnlearnBatchNormJitted(1))}
        for name, handler in handlers.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as error:  # a stale or foreign build: say why, keep XLA's ops
        return False, f"loading {_LIBRARY.name} failed: {error}"
    return True, native_bf16


_off = threading.local()


@contextlib.contextmanager
def disabled():
    """XLA's own convolutions and batch norms for what is traced inside, on this thread.

    For exported programs (their custom calls would not run without fnlearn) and for
    XLA's cost analysis (which counts no FLOPs in a custom call). Trace a fresh
    function inside: a function jax traced before keeps its cached program.
    """
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def enabled():
    """Whether CPU convolutions and batch norms run in oneDNN: the library loads, FNLEARN_ONEDNN
    is not 0, and no `disabled()` is open."""
    if os.environ.get(ENV, "1") == "0" or getattr(_off, "on", False):
        return False
    loaded, detail = _load()
    if not loaded and jax.default_backend() == "cpu":
        _say_once(detail)
    return loaded


def native_bfloat16(op="conv"):
    """Whether oneDNN runs `op` ("conv" or "batch_norm") on bfloat16 in bf16 on this CPU: convolutions
    need AVX512-BF16, AMX or AVX2-VNNI-2; batch norm, AVX-512 (oneDNN 3.2 has no other bf16 kernel)."""
    return enabled() and _load()[1][op]


def describe():
    """What runs the CPU convolutions and bf16 batch norms (the ops routed here), for a run's log
    or summary: a bf16 run's speed and rounding depend on it. None off the CPU."""
    if jax.default_backend() != "cpu":
        return None
    if not enabled():
        return "XLA's own"
    conv = "native" if native_bfloat16() else "in fp32"
    norm = "oneDNN" if native_bfloat16("batch_norm") else "XLA"
    return f"oneDNN convolutions, bf16 {conv}; bf16 batch norms in {norm}"


@functools.cache
def _say_once(why):
    warnings.warn(f"fnlearn: CPU convolutions and batch norms use XLA's own, not oneDNN: {why}.", stacklevel=3)


def _out_size(size, window, stride, pad):
    return (size + pad[0] + pad[1] - window) // stride + 1


# What each primitive computes, in lax: the lowering everywhere the FFI call does not go,
# and the batching rule where a mapped axis cannot join the batch. All go through
# `fnlearn.ops.conv.spatial_conv` (imported late: conv.py imports this module), whose
# gradient convolutions XLA:CPU runs in Eigen's layouts even inside a loop (lax's own
# run there as a loop nest, many times slower). The gradients are taken with `jax.vjp`:
# `jax.linear_transpose` skips spatial_conv's JVP rule and gets lax's layouts back; the
# forward convolution vjp also traces is dead code, which XLA drops.
def _forward_ref(x, kernel, *, strides, padding):
    from fnlearn.ops.conv import spatial_conv
    return spatial_conv(x, kernel, strides, padding)


def _input_grad_ref(dy, kernel, *, strides, padding, input_shape):
    from fnlearn.ops.conv import spatial_conv
    x = jnp.zeros(input_shape, dy.dtype)
    return jax.vjp(lambda x: spatial_conv(x, kernel, strides, padding), x)[1](dy)[0]


def _kernel_grad_ref(x, dy, *, strides, padding, window):
    from fnlearn.ops.conv import spatial_conv
    kernel = jnp.zeros(tuple(window) + (x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.vjp(lambda k: spatial_conv(x, k, strides, padding), kernel)[1](dy)[0]


def primitive(name, reference, abstract, target=None, attributes=None, multiple_results=False, takes=None):
    """A JAX primitive that lowers to the FFI call `target` on CPU and to `reference` (lax)
    elsewhere, and where the call cannot go.

    Args:
      name: the primitive's name, after "fnlearn_onednn_".
      reference: what it computes, in lax, with its parameters as keywords.
      abstract: its abstract evaluation.
      target: the FFI target (None: `reference` everywhere).
      attributes: the call's attributes from the parameters (default: the parameters).
      multiple_results: whether it returns a list.
      takes: whether the call takes operands of these avals (default: any).
    """
    prim = Primitive(f"fnlearn_onednn_{name}")
    prim.multiple_results = multiple_results

    @functools.cache  # one compiled program per parameters, for calls outside jit
    def eager(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    def impl(*args, **params):
        # With jit on, as JAX's own primitives run: under `jax.disable_jit()` the jit
        # would call this impl again, without end.
        with jax.disable_jit(False):
            return eager(**params)(*args)

    prim.def_impl(impl)
    prim.def_abstract_eval(abstract)
    lax_lowering = mlir.lower_fun(reference, multiple_results=multiple_results)
    mlir.register_lowering(prim, lax_lowering)
    if target is None:
        return prim
    ffi = jax.ffi.ffi_lowering(target)

    def lower_cpu(ctx, *args, **params):
        # lax where the FFI call cannot go or is turned off: the library did not load, or
        # FNLEARN_ONEDNN=0 or `disabled()` (`enabled()`); `jax.export` (the file must run
        # without fnlearn); a program split over several devices (XLA's partitioner cannot
        # split a custom call, so it would gather the whole batch onto every device);
        # operands the call does not take.
        if (not enabled() or ctx.module_context.lowering_parameters.for_export
                or getattr(ctx.module_context.axis_context, "num_devices", 1) > 1
                or (takes is not None and not takes(*ctx.avals_in))):
            return lax_lowering(ctx, *args, **params)
        return ffi(ctx, *args, **(attributes(**params) if attributes else params))

    mlir.register_lowering(prim, lower_cpu, platform="cpu")
    return prim


def _check(a, b, size_a, size_b, what="channel counts"):
    """Raises TypeError unless the operands are what the library takes, sizes `what` agreeing."""
    if a.ndim != 4 or b.ndim != 4 or a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"oneDNN conv: two 4-D float32 or bfloat16 operands of one dtype, got "
                        f"{a.str_short()} and {b.str_short()}")
    if size_a != size_b:
        raise TypeError(f"oneDNN conv: {what} differ: {a.str_short()} and {b.str_short()}")


def _forward_shape(x, kernel, *, strides, padding):
    _check(x, kernel, x.shape[3], kernel.shape[2])
    spatial = [_out_size(x.shape[i + 1], kernel.shape[i], strides[i], padding[i]) for i in range(2)]
    return jax.core.ShapedArray((x.shape[0], *spatial, kernel.shape[-1]), x.dtype)


def _input_grad_shape(dy, kernel, *, input_shape, **_):
    _check(dy, kernel, dy.shape[3], kernel.shape[3])
    return jax.core.ShapedArray(input_shape, dy.dtype)


def _kernel_grad_shape(x, dy, *, window, **_):
    _check(x, dy, x.shape[0], dy.shape[0], what="batch sizes")
    return jax.core.ShapedArray(tuple(window) + (x.shape[-1], dy.shape[-1]), x.dtype)


def _conv_attributes(strides, padding, **_):
    return {"strides": np.asarray(strides, np.int64), "padding": np.asarray(padding, np.int64).ravel()}


conv_p = primitive("forward", _forward_ref, _forward_shape, "fnlearn_conv_forward", _conv_attributes)
input_grad_p = primitive("input_grad", _input_grad_ref, _input_grad_shape, "fnlearn_conv_input_grad",
                         _conv_attributes)
kernel_grad_p = primitive("kernel_grad", _kernel_grad_ref, _kernel_grad_shape, "fnlearn_conv_kernel_grad",
                          _conv_attributes)


def conv(x, kernel, strides, padding):
    """A NHWC x HWIO convolution in oneDNN on CPU; x and kernel of one dtype, f32 or bf16.

    Args:
      x: (B, H, W, C) input.
      kernel: (KH, KW, C, O) kernel.
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)), each >= 0.
    Returns:
      (B, OH, OW, O), as `lax.conv_general_dilated` with NHWC / HWIO / NHWC numbers.
    """
    return conv_p.bind(x, kernel, strides=tuple(strides), padding=tuple(map(tuple, padding)))


# Transposes: <dy, conv(x, k)> = <input_grad(dy, k), x> = <kernel_grad(x, dy), k>.
def _shape(operand):  # of a value, or of the undefined primal being transposed
    return operand.aval.shape if hasattr(operand, "aval") else np.shape(operand)


def _conv_t_x(ct, x, kernel, *, strides, padding):
    return input_grad_p.bind(ct, kernel, strides=strides, padding=padding, input_shape=_shape(x))


def _conv_t_kernel(ct, x, kernel, *, strides, padding):
    return kernel_grad_p.bind(x, ct, strides=strides, padding=padding, window=_shape(kernel)[:2])


def _input_grad_t_dy(ct, dy, kernel, *, strides, padding, input_shape):
    return conv_p.bind(ct, kernel, strides=strides, padding=padding)


def _input_grad_t_kernel(ct, dy, kernel, *, strides, padding, input_shape):
    return kernel_grad_p.bind(ct, dy, strides=strides, padding=padding, window=_shape(kernel)[:2])


def _kernel_grad_t_x(ct, x, dy, *, strides, padding, window):
    return input_grad_p.bind(dy, ct, strides=strides, padding=padding, input_shape=_shape(x))


def _kernel_grad_t_dy(ct, x, dy, *, strides, padding, window):
    return conv_p.bind(x, ct, strides=strides, padding=padding)


ad.defbilinear(conv_p, _conv_t_x, _conv_t_kernel)
ad.defbilinear(input_grad_p, _input_grad_t_dy, _input_grad_t_kernel)
ad.defbilinear(kernel_grad_p, _kernel_grad_t_x, _kernel_grad_t_dy)


def _batcher(primitive, reference, folds):
    """Folds a mapped axis of operand `folds` into its batch when the other operand is
    unmapped; otherwise (and always for the kernel gradient, which sums over the
    batch) vmaps lax's convolution."""
    def rule(args, dims, **params):
        if folds is not None and dims[1 - folds] is None:
            operands = list(args)
            mapped = jnp.moveaxis(args[folds], dims[folds], 0)
            operands[folds] = mapped.reshape((mapped.shape[0] * mapped.shape[1],) + mapped.shape[2:])
            if "input_shape" in params:
                params = dict(params, input_shape=(operands[0].shape[0],) + tuple(params["input_shape"][1:]))
            out = primitive.bind(*operands, **params)
            return out.reshape(mapped.shape[:2] + out.shape[1:]), 0
        return jax.vmap(functools.partial(reference, **params), in_axes=dims)(*args), 0
    batching.primitive_batchers[primitive] = rule


_batcher(conv_p, _forward_ref, folds=0)
_batcher(input_grad_p, _input_grad_ref, folds=0)
_batcher(kernel_grad_p, _kernel_grad_ref, folds=None)
