"""ONNX export by walking a function's jaxpr: a focused converter for the zoo's primitives.

Why not jax2onnx (the field's converter; Keras 3 exports through it): its latest release,
0.17.1, refuses FastNet (no rule for `platform_index`, which `lax.platform_dependent`
leaves in every zoo model) and writes a ResNet-18 graph that onnxruntime rejects
(incompatible shapes at an Add); it also pins orbax-checkpoint below 0.11.37.

How it works. The function is traced to a jaxpr with a symbolic batch dimension and read
equation by equation. Every value is a NumPy constant (weights, and anything computed from
weights alone: BatchNorm's scale and shift fold here), an ONNX tensor, or a pending
convolution: a Conv whose weights and bias still absorb per-channel multiplies and adds
that follow it, which is how BatchNorm folds into the conv before it. `platform_dependent`
takes its default branch (the plain lax op: ONNX runtimes have their own fast Conv and
MaxPool). JAX's NHWC convolutions become NCHW ONNX Convs between Transposes; adjacent
Transposes cancel here, and onnxruntime's transpose optimiser moves the rest.
"""
import collections

import numpy as np

try:
    import onnx
    from onnx import helper, numpy_helper
except ImportError:  # the `onnx` extra
    onnx = None

import jax
from jax.extend import core as jcore

OPSET = 18


class ExportError(ValueError):
    """The function uses something this converter does not translate; the message names it."""


def _onnx_type(dtype):
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _refuse_bfloat16(eqn, op):
    """ONNX's `op` (opset 18) has no bfloat16: say so, where onnx's checker would throw a shape-inference error."""
    if eqn.invars[0].aval.dtype == jax.numpy.bfloat16:
        raise ExportError(f"ONNX's {op} takes no bfloat16: export the model built in float32 (its parameters "
                          "load unchanged)")


def _is_static(shape):
    return all(isinstance(d, int) for d in shape)


class _Conv:
    """A convolution not yet written: ONNX Conv on `x` (NCHW) with kernel `w` (OIHW) and bias `b`,
    whose NCHW result is transposed by `out_perm` into the jaxpr's layout."""

    def __init__(self, x, w, b, attrs, out_perm, shape):
        self.x, self.w, self.b, self.attrs, self.out_perm, self.shape = x, w, b, attrs, out_perm, shape

    @property
    def feature_axis(self):
        return self.out_perm.index(1)

    def per_channel(self, c):
        """`c` as a (C_out,) vector if it varies along the feature axis only (or not at all), else None."""
        c = np.asarray(c)
        if c.ndim > len(self.shape) or c.dtype != self.w.dtype:
            return None
        full = (1,) * (len(self.shape) - c.ndim) + c.shape
        axis = self.feature_axis
        if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, self.w.shape[0]):
            return None
        return np.broadcast_to(c.reshape(-1), self.b.shape).astype(self.w.dtype)

    def replace(self, w, b):
        return _Conv(self.x, w, b, self.attrs, self.out_perm, self.shape)


class _Graph:
    """The ONNX graph under construction, and the jaxpr interpreter that fills it."""

    def __init__(self, inputs):
        self.nodes, self.initializers, self.count = [], [], 0
        self.producer = {}  # tensor name -> (input name, perm) of the Transpose that made it
        self.dims = {}  # symbolic dim name -> 1-element int64 tensor of its runtime size
        self.inputs = inputs

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value):
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def tensor(self, value):
        """The ONNX tensor name of an interpreter value, writing constants and pending convs out."""
        if isinstance(value, str):
            return value
        if isinstance(value, _Conv):
            y = self.node("Conv", [value.x, self.const(value.w), self.const(value.b)], **value.attrs)
            return self.transpose(y, value.out_perm)
        return self.const(value)

    def transpose(self, x, perm):
        perm = tuple(int(p) for p in perm)
        if x in self.producer:  # Transpose of a Transpose: one, or none
            source, first = self.producer[x]
            x, perm = source, tuple(first[p] for p in perm)
        if perm == tuple(range(len(perm))):
            return x
        y = self.node("Transpose", [x], perm=list(perm))
        self.producer[y] = (x, perm)
        return y

    def prune(self, outputs):
        """Drops the nodes no output needs (a cancelled Transpose's first half, an unread Shape)."""
        needed, kept = set(outputs), []
        for node in reversed(self.nodes):
            if needed.intersection(node.output):
                kept.append(node)
                needed.update(node.input)
        self.nodes = kept[::-1]
        self.initializers = [t for t in self.initializers if t.name in needed]

    def shape(self, shape):
        """A 1-D int64 tensor of `shape`, whose symbolic dims are read from the inputs at run time."""
        if _is_static(shape):
            return self.const(np.array(shape, np.int64))
        parts = []
        for d in shape:
            if isinstance(d, int):
                parts.append(self.const(np.array([d], np.int64)))
            elif str(d) in self.dims:
                parts.append(self.dims[str(d)])
            else:
                raise ExportError(f"dimension {d} is not an input's dimension; only input dims can be dynamic")
        return self.node("Concat", parts, axis=0)

    def bind_dims(self, name, shape):
        for axis, d in enumerate(shape):
            if not isinstance(d, int) and str(d) not in self.dims:
                whole = self.node("Shape", [name])
                self.dims[str(d)] = self.node("Slice", [whole, self.const(np.array([axis], np.int64)),
                                                        self.const(np.array([axis + 1], np.int64))])

    # --- the interpreter ---

    def run(self, jaxpr, consts, args):
        env = {}
        uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jcore.Var))
        uses.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))

        def read(v):
            if isinstance(v, jcore.Literal):
                return np.asarray(v.val, v.aval.dtype)
            if isinstance(env[v], _Conv) and uses[v] > 1:  # folding into one use would change the others
                env[v] = self.tensor(env[v])
            return env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = np.asarray(value)
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def call(self, closed, args):
        if isinstance(closed, jcore.ClosedJaxpr):
            return self.run(closed.jaxpr, closed.consts, args)
        return self.run(closed, [], args)

    def equation(self, eqn, args):
        name, params = eqn.primitive.name, eqn.params
        if name == "platform_index":  # lax.platform_dependent: the default (plain lax) branch
            if None not in params["platforms"]:
                raise ExportError(f"platform_dependent without a default branch: {params['platforms']}")
            return [np.asarray(params["platforms"].index(None), np.int32)]
        if name == "cond":
            if not isinstance(args[0], np.ndarray):
                raise ExportError("lax.cond on a value known only at run time is not translated")
            return self.call(params["branches"][int(args[0])], args[1:])
        if name in _CALLS:  # a function call: its body, inline (scan and while are loops, not calls)
            return self.call(params["jaxpr" if "jaxpr" in params else "call_jaxpr"], args)
        static = all(_is_static(v.aval.shape) for v in eqn.outvars)
        if static and all(isinstance(a, np.ndarray) for a in args):  # weights only: fold now
            outs = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params))
            return [np.asarray(o) for o in (outs if eqn.primitive.multiple_results else [outs])]
        rule = _RULES.get(name)
        if rule is None:
            raise ExportError(f"no ONNX translation for the primitive {name!r}")
        return [rule(self, eqn, *args)]


def _binary(op):
    def rule(g, eqn, x, y):
        return g.node(op, [g.tensor(x), g.tensor(y)])
    return rule


def _unary(op):
    def rule(g, eqn, x):
        return g.node(op, [g.tensor(x)])
    return rule


def _fold_add(g, eqn, x, y, sign=1.0):
    """x + sign * y, into a pending conv's bias where one side is one and the other per-channel."""
    for conv, c, s_conv, s_c in ((x, y, 1.0, sign), (y, x, sign, 1.0)):
        if isinstance(conv, _Conv) and isinstance(c, np.ndarray) and (v := conv.per_channel(c)) is not None:
            return conv.replace(s_conv * conv.w, s_conv * conv.b + s_c * v)
    return g.node("Add" if sign > 0 else "Sub", [g.tensor(x), g.tensor(y)])


def _fold_mul(g, eqn, x, y, divide=False):
    """x * y (or x / y), into a pending conv's kernel and bias where the other side is per-channel."""
    pairs = ((x, y),) if divide else ((x, y), (y, x))
    for conv, c in pairs:
        if isinstance(conv, _Conv) and isinstance(c, np.ndarray) and (v := conv.per_channel(c)) is not None:
            v = 1 / v if divide else v
            return conv.replace(conv.w * v.reshape((-1,) + (1,) * (conv.w.ndim - 1)), conv.b * v)
    return g.node("Div" if divide else "Mul", [g.tensor(x), g.tensor(y)])


def _neg(g, eqn, x):
    if isinstance(x, _Conv):
        return x.replace(-x.w, -x.b)
    return g.node("Neg", [g.tensor(x)])


def _max(g, eqn, x, y):
    """max(x, 0) as Relu, which onnxruntime fuses into the Conv before it; else Max."""
    for a, b in ((x, y), (y, x)):
        if isinstance(b, np.ndarray) and b.size == 1 and b.item() == 0 and not isinstance(a, np.ndarray):
            return g.node("Relu", [g.tensor(a)])
    return g.node("Max", [g.tensor(x), g.tensor(y)])


def _conv(g, eqn, x, w):
    _refuse_bfloat16(eqn, "Conv")
    p = eqn.params
    if not isinstance(w, np.ndarray):
        raise ExportError("a convolution whose kernel is computed at run time is not translated")
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise ExportError("transposed (lhs-dilated) and batch-grouped convolutions are not translated")
    lhs, rhs, out = p["dimension_numbers"]
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    attrs = dict(strides=list(p["window_strides"]), pads=pads, dilations=list(p["rhs_dilation"]),
                 group=p["feature_group_count"], kernel_shape=[w.shape[a] for a in rhs[2:]])
    out_perm = [0] * len(out)
    for logical, axis in enumerate(out):  # the jaxpr's axis `axis` holds NCHW's axis `logical`
        out_perm[axis] = logical
    kernel = np.ascontiguousarray(np.transpose(w, rhs))
    bias = np.zeros(kernel.shape[0], kernel.dtype)
    return _Conv(g.transpose(g.tensor(x), lhs), kernel, bias, attrs, tuple(out_perm), eqn.outvars[0].aval.shape)


def _dot_general(g, eqn, x, y):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    x_rank, y_rank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    if lb or rb or tuple(lc) != (x_rank - 1,) or tuple(rc) != (0,) or y_rank != 2:
        raise ExportError(f"dot_general {eqn.params['dimension_numbers']} is not translated (only x @ W)")
    return g.node("MatMul", [g.tensor(x), g.tensor(y)])


def _reshape(g, x, shape):
    """Reshape to `shape`; one dynamic dim is left to Reshape's -1, several are read at run time."""
    dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    if len(dynamic) > 1:
        target = g.shape(shape)
    else:
        target = g.const(np.array([-1 if i in dynamic else d for i, d in enumerate(shape)], np.int64))
    return g.node("Reshape", [g.tensor(x), target])


def _broadcast_in_dim(g, eqn, x):
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    in_shape = eqn.invars[0].aval.shape
    x = g.tensor(x)
    if len(in_shape) != len(shape):  # put the operand's axes where `dims` says, size 1 elsewhere
        ranked = [1] * len(shape)
        for axis, d in zip(dims, in_shape):
            ranked[axis] = d
        x = _reshape(g, x, ranked)
    if tuple(in_shape) == tuple(shape):
        return x
    return g.node("Expand", [x, g.shape(shape)])


def _reduce(op):
    def rule(g, eqn, x):
        if not eqn.params["axes"]:  # a no-op in JAX; ONNX reads empty axes as "all of them"
            return g.tensor(x)
        axes = g.const(np.array(eqn.params["axes"], np.int64))
        return g.node(op, [g.tensor(x), axes], keepdims=0)
    return rule


def _max_pool(g, eqn, x):
    _refuse_bfloat16(eqn, "MaxPool")
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    if any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"]):
        raise ExportError("dilated max-pooling is not translated")
    if (window[0], window[-1], strides[0], strides[-1]) != (1,) * 4 or any(padding[0]) or any(padding[-1]):
        raise ExportError("max-pooling over the batch or channel axis is not translated")
    n = len(window)
    to_nchw = (0, n - 1) + tuple(range(1, n - 1))
    pads = [lo for lo, _ in padding[1:-1]] + [hi for _, hi in padding[1:-1]]
    y = g.node("MaxPool", [g.transpose(g.tensor(x), to_nchw)], kernel_shape=list(window[1:-1]),
               strides=list(strides[1:-1]), pads=pads)
    return g.transpose(y, (0,) + tuple(range(2, n)) + (1,))


def _integer_pow(g, eqn, x):
    x = g.tensor(x)
    if eqn.params["y"] == 2:
        return g.node("Mul", [x, x])
    return g.node("Pow", [x, g.const(np.array(eqn.params["y"], eqn.invars[0].aval.dtype))])


def _select_n(g, eqn, which, *cases):
    if len(cases) != 2 or eqn.invars[0].aval.dtype != np.bool_:
        raise ExportError("select_n other than a boolean choice of two is not translated")
    return g.node("Where", [g.tensor(which), g.tensor(cases[1]), g.tensor(cases[0])])


# Primitives that call a jaxpr once (jit, custom derivatives, remat), by name.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "checkpoint", "remat2")

_RULES = {
    "add": _fold_add,
    "sub": lambda g, eqn, x, y: _fold_add(g, eqn, x, y, sign=-1.0),
    "mul": _fold_mul,
    "div": lambda g, eqn, x, y: _fold_mul(g, eqn, x, y, divide=True),
    "neg": _neg,
    "max": _max,
    "min": _binary("Min"),
    "pow": _binary("Pow"),
    "gt": _binary("Greater"),
    "lt": _binary("Less"),
    "ge": _binary("GreaterOrEqual"),
    "le": _binary("LessOrEqual"),
    "eq": _binary("Equal"),
    "exp": _unary("Exp"),
    "log": _unary("Log"),
    "tanh": _unary("Tanh"),
    "logistic": _unary("Sigmoid"),
    "erf": _unary("Erf"),
    "sqrt": _unary("Sqrt"),
    "rsqrt": lambda g, eqn, x: g.node("Reciprocal", [g.node("Sqrt", [g.tensor(x)])]),
    "abs": _unary("Abs"),
    "integer_pow": _integer_pow,
    "convert_element_type": lambda g, eqn, x: g.node("Cast", [g.tensor(x)],
                                                     to=_onnx_type(eqn.params["new_dtype"])),
    "reshape": lambda g, eqn, x: _reshape(g, x, eqn.params["new_sizes"]),
    "squeeze": lambda g, eqn, x: _reshape(g, x, eqn.outvars[0].aval.shape),
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": lambda g, eqn, x: g.transpose(g.tensor(x), eqn.params["permutation"]),
    "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"),
    "reduce_sum": _reduce("ReduceSum"),
    "reduce_window_max": _max_pool,
    "conv_general_dilated": _conv,
    "dot_general": _dot_general,
    "select_n": _select_n,
    "copy": lambda g, eqn, x: g.tensor(x),
    "copy_p": lambda g, eqn, x: g.tensor(x),
}


def export(fn, *specs, input_names=None, output_names=None, metadata=None):
    """Converts `fn` to an ONNX model (opset 18) for inputs shaped like `specs`.

    Args:
      fn: a function of arrays returning an array or a tuple of arrays; whatever it closes
        over (the weights) becomes constants of the graph.
      *specs: one `jax.ShapeDtypeStruct` per argument; a dim from `jax.export.symbolic_shape`
        (e.g. the batch) stays dynamic in the ONNX model, named as it is named there.
      input_names, output_names: the graph's names (default input_0..., output_0...).
      metadata: str -> str pairs for the model's `metadata_props` (labels, normalisation).
    Returns:
      a checked `onnx.ModelProto`.
    Raises:
      ExportError: `fn` uses a primitive or form that is not translated.
    """
    if onnx is None:
        raise ExportError("ONNX export needs the onnx package: pip install -e '.[onnx]'")
    closed = jax.make_jaxpr(fn)(*specs)
    input_names = input_names or [f"input_{i}" for i in range(len(specs))]
    graph = _Graph(input_names)
    for name, spec in zip(input_names, specs):
        graph.bind_dims(name, spec.shape)
    outs = graph.run(closed.jaxpr, closed.consts, list(input_names))
    outs = [graph.tensor(o) for o in outs]
    output_names = output_names or [f"output_{i}" for i in range(len(outs))]
    if len(output_names) != len(outs):
        raise ExportError(f"{len(output_names)} output names for {len(outs)} outputs")
    for out, name in zip(outs, output_names):  # name the results as asked
        graph.nodes.append(helper.make_node("Identity", [out], [name], name=f"{name}_identity"))

    graph.prune(output_names)

    def value_info(name, aval):
        dims = [d if isinstance(d, int) else str(d) for d in aval.shape]
        return helper.make_tensor_value_info(name, _onnx_type(aval.dtype), dims)

    model = helper.make_model(
        helper.make_graph(graph.nodes, "fnlearn",
                          [value_info(n, s) for n, s in zip(input_names, specs)],
                          [value_info(n, v.aval) for n, v in zip(output_names, closed.jaxpr.outvars)],
                          graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fnlearn")
    model.ir_version = 9  # what onnxruntime 1.18 and later read
    helper.set_model_props(model, dict(metadata or {}))
    onnx.checker.check_model(model, full_check=True)
    return model
