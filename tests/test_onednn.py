"""The oneDNN convolutions (fnlearn.ops.onednn): values and every kind of derivative
against lax, vmap, scan, donation, threads, and the fallback to XLA's own.

Skipped where the library is not built, unless FNLEARN_REQUIRE_ONEDNN=1 (CI)."""
import ctypes
import os
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conv_testing import NHWC, compiled_text, conv_pair, max_relative_error
from fnlearn.ops import onednn
from fnlearn.ops.conv import conv_general_dilated

TARGET = "fnlearn_conv_"

if not onednn.enabled():
    if os.environ.get("FNLEARN_REQUIRE_ONEDNN") == "1":
        why = f"{onednn.ENV}={os.environ.get(onednn.ENV)}" if onednn._load()[0] else onednn._load()[1]
        raise RuntimeError(f"FNLEARN_REQUIRE_ONEDNN=1 but oneDNN is off: {why}")
    pytest.skip("the oneDNN library is not built here", allow_module_level=True)

# (input shape, kernel shape, strides, padding): stride 2, odd sizes, asymmetric and
# one-sided padding, a 7x7 stem, a padded 1x1, input rows no output reads (their input
# gradient is 0), a stride longer than the window.
CASES = {
    "3x3_same": ((2, 9, 9, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1))),
    "3x3_stride2_odd": ((3, 11, 9, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1))),
    "asymmetric": ((2, 9, 7, 4), (3, 2, 4, 6), (2, 1), ((0, 2), (1, 0))),
    "7x7_stem": ((1, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    "padded_1x1": ((2, 6, 6, 4), (1, 1, 4, 5), (1, 1), ((1, 1), (1, 1))),
    "unread_rows": ((2, 10, 10, 4), (3, 3, 4, 6), (2, 2), ((0, 0), (0, 0))),
    "stride_over_window": ((2, 9, 9, 4), (2, 2, 4, 6), (3, 3), ((0, 0), (0, 0))),
}


def case(name, dtype=jnp.float32):
    return conv_pair(*CASES[name], dtype)


def loss_of(conv):
    return lambda x, w: jnp.sum(jnp.tanh(conv(x, w).astype(jnp.float32)))


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_match_lax(name):
    ours, ref, x, w = case(name)
    value_and_grads = lambda conv: jax.jit(jax.value_and_grad(loss_of(conv), argnums=(0, 1)))(x, w)  # noqa: E731
    (got, got_grads), (want, want_grads) = value_and_grads(ours), value_and_grads(ref)
    assert max_relative_error(got, want) < 1e-5
    for g, h in zip(got_grads, want_grads):
        assert g.shape == h.shape and g.dtype == h.dtype and max_relative_error(g, h) < 1e-4
    text = compiled_text(jax.grad(loss_of(ours), argnums=(0, 1)), x, w)
    for direction in ("forward", "input_grad", "kernel_grad"):
        assert TARGET + direction in text
    assert " convolution(" not in text


@pytest.mark.parametrize("name", ["3x3_same", "asymmetric"])
def test_bfloat16_matches_lax(name):
    ours, ref, x, w = case(name, jnp.bfloat16)
    got = jax.jit(jax.value_and_grad(loss_of(ours), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.value_and_grad(loss_of(ref), argnums=(0, 1)))(x, w)
    assert got[1][0].dtype == got[1][1].dtype == jnp.bfloat16
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert max_relative_error(g, h) < 2e-2  # bf16 keeps 8 bits: ~4e-3 per rounding
    # Native bf16 kernels where the CPU has them; else float32, as XLA does.
    operand = "bf16[2,9,9,8]" if onednn.native_bfloat16() else "f32[2,9,9,8]"
    if name == "3x3_same":
        call = next(line for line in compiled_text(ours, x, w).splitlines() if TARGET + "forward" in line)
        assert operand in call
        assert onednn.describe().startswith("oneDNN convolutions, bf16 " + ("native" if "bf16[" in call else "in fp32"))


def test_other_dtypes_and_empty_results_match_lax():
    ours, ref, x, w = case("3x3_same")
    # float16 runs in float32 and rounds back, as XLA's own does; a bf16 conv asked
    # for a float32 result accumulates and returns float32.
    x16, w16 = x.astype(jnp.float16), w.astype(jnp.float16)
    assert ours(x16, w16).dtype == jnp.float16 and max_relative_error(ours(x16, w16), ref(x16, w16)) < 2e-3
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    wide = lambda conv: conv(xb, wb, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC,  # noqa: E731
                             preferred_element_type=jnp.float32)
    assert wide(conv_general_dilated).dtype == jnp.float32
    assert max_relative_error(wide(conv_general_dilated), wide(lax.conv_general_dilated)) < 1e-5
    # A window longer than the padded input: an empty result, as lax gives (oneDNN refuses it).
    small = lambda conv: conv(x[:, :2], w, (2, 2), ((0, 0), (0, 0)), dimension_numbers=NHWC)  # noqa: E731
    assert small(conv_general_dilated).shape == small(lax.conv_general_dilated).shape == (2, 0, 4, 16)
    # Zero input channels (a 1x1 dot), and an empty mapped image: shapes as lax's.
    pointwise = lambda conv: conv(x[..., :0], w[:1, :1, :0], (1, 1), "VALID", dimension_numbers=NHWC)  # noqa: E731
    assert pointwise(conv_general_dilated).shape == pointwise(lax.conv_general_dilated).shape == (2, 9, 9, 16)
    mapped = lambda conv: jax.vmap(lambda x: conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC))  # noqa: E731
    empty = jnp.zeros((3, 2, 0, 9, 8))
    assert mapped(conv_general_dilated)(empty).shape == mapped(lax.conv_general_dilated)(empty).shape


def test_a_library_built_from_another_source_is_refused():
    # A source tree's library after a pull that changed a source, before it is rebuilt.
    other = types.SimpleNamespace(FnlearnOnednnSource=lambda: b"0123456789abcdef")
    assert "was built from other sources than _onednn/'s (reinstall" in onednn._stale(other)
    assert onednn._stale(types.SimpleNamespace()) is not None  # from before the library said its source
    assert onednn._stale(ctypes.CDLL(str(onednn._LIBRARY))) is None  # this one's (loaded: libdnnl is too)


def test_op_by_op_under_disable_jit():
    # Debugging runs every op eagerly; the primitives' own impl must not recurse.
    ours, ref, x, w = case("3x3_same")
    with jax.disable_jit():
        got = jax.value_and_grad(loss_of(ours), argnums=(0, 1))(x, w)
    want = jax.jit(jax.value_and_grad(loss_of(ref), argnums=(0, 1)))(x, w)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert max_relative_error(g, h) < 1e-4


def test_forward_mode_and_second_order():
    ours, ref, x, w = case("3x3_stride2_odd")
    rng = np.random.default_rng(1)
    dx, dw = rng.standard_normal(x.shape).astype(np.float32), rng.standard_normal(w.shape).astype(np.float32)
    assert max_relative_error(jax.jvp(ours, (x, w), (dx, dw))[1], jax.jvp(ref, (x, w), (dx, dw))[1]) < 1e-4
    # Forward over reverse (a Hessian-vector product) and reverse over reverse: every
    # transpose of every direction is used.
    hvp = lambda conv: jax.jit(lambda w: jax.jvp(jax.grad(lambda w: loss_of(conv)(x, w)), (w,), (dw,))[1])(w)  # noqa: E731
    assert max_relative_error(hvp(ours), hvp(ref)) < 1e-4

    def grad_of_grad_norm(conv):
        def norm(x, w):
            gx, gw = jax.grad(loss_of(conv), argnums=(0, 1))(x, w)
            return jnp.sum(gx ** 2) + jnp.sum(gw ** 2)
        return jax.jit(jax.grad(norm, argnums=(0, 1)))(x, w)

    for g, h in zip(grad_of_grad_norm(ours), grad_of_grad_norm(ref)):
        assert max_relative_error(g, h) < 1e-4


def test_vmap_per_example_gradients_and_mapped_kernels():
    ours, ref, x, w = case("3x3_same")
    per_example = lambda conv: jax.jit(jax.vmap(jax.grad(  # noqa: E731
        lambda x, w: loss_of(conv)(x[None], w), argnums=(0, 1)), in_axes=(0, None)))(x, w)
    for g, h in zip(per_example(ours), per_example(ref)):
        assert g.shape == h.shape and max_relative_error(g, h) < 1e-4
    # The forward and input-gradient calls take the mapped axis into their batch.
    text = jax.jit(jax.vmap(jax.grad(lambda x, w: loss_of(ours)(x[None], w), argnums=(0, 1)),
                            in_axes=(0, None))).lower(x, w).compile().as_text()
    assert TARGET + "forward" in text and TARGET + "input_grad" in text
    kernels = jnp.stack([w, 2 * w, -w])  # a mapped kernel: lax's convolution, mapped
    mapped = lambda conv: jax.jit(jax.vmap(conv, in_axes=(None, 0)))(x, kernels)  # noqa: E731
    assert max_relative_error(mapped(ours), mapped(ref)) < 1e-5


def test_gradients_inside_scan_with_donated_state():
    # A tiny conv net's SGD steps in a lax.scan, the state donated, as the recipes run.
    _, _, x, w = case("3x3_same")
    w2 = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 16, 4)) * 0.1, jnp.float32)

    def run(conv):
        def loss(params, x):
            h = jax.nn.relu(conv(x, params[0], (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))
            return jnp.mean(conv(h, params[1], (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC) ** 2)

        def step(params, i):
            grads = jax.grad(loss)(params, x + 0.1 * i)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss(params, x)

        scan = jax.jit(lambda params: lax.scan(step, params, jnp.arange(3.0)), donate_argnums=0)
        return scan((w + 0, w2 + 0)), scan

    (got, got_losses), scan = run(conv_general_dilated)
    (want, want_losses), _ = run(lax.conv_general_dilated)
    assert max_relative_error(got_losses, want_losses) < 1e-5
    for g, h in zip(got, want):
        assert max_relative_error(g, h) < 1e-4
    assert TARGET + "kernel_grad" in compiled_text(scan, (w, w2))


def test_calls_from_several_threads_agree():
    names = ["3x3_same", "3x3_stride2_odd", "asymmetric", "7x7_stem"]
    jobs = {name: case(name) for name in names}
    fns = {name: jax.jit(jax.grad(loss_of(ours), argnums=(0, 1))) for name, (ours, _, _, _) in jobs.items()}
    want = {name: jax.grad(loss_of(ref), argnums=(0, 1))(x, w) for name, (_, ref, x, w) in jobs.items()}
    results, failures = {}, []

    def work(name, repeat):
        try:
            _, _, x, w = jobs[name]
            for _ in range(5):
                results[name, repeat] = jax.block_until_ready(fns[name](x, w))
        except Exception as e:  # surfaced below, not lost in the thread
            failures.append(e)

    threads = [threading.Thread(target=work, args=(name, r)) for name in names for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for (name, _), got in results.items():
        for g, h in zip(got, want[name]):
            assert max_relative_error(g, h) < 1e-4


def test_one_execution_runs_at_a_time():
    # Each runs on every core: XLA's independent calls (the input and kernel gradients of one
    # conv) and calls from several threads queue instead of sharing the cores.
    library = ctypes.CDLL(str(onednn._LIBRARY))
    test_calls_from_several_threads_agree()
    assert library.FnlearnOnednnPeakExecutions() == 1


def test_plans_beyond_the_capacity_are_evicted_while_other_threads_run_them():
    library = ctypes.CDLL(str(onednn._LIBRARY))  # the library already loaded: its plans
    library.FnlearnConvSetPlanCapacity.argtypes = [ctypes.c_int64]
    library.FnlearnConvSetPlanCapacity.restype = library.FnlearnConvPlansBuilt.restype = ctypes.c_int64
    before = library.FnlearnConvSetPlanCapacity(1)  # each new plan evicts one a thread may be running
    try:
        built = library.FnlearnConvPlansBuilt()
        test_calls_from_several_threads_agree()
        # 4 cases x 3 directions are 12 plans: more builds mean plans went and came back.
        assert library.FnlearnConvPlansBuilt() - built > 12
    finally:
        library.FnlearnConvSetPlanCapacity(before)


def test_switched_off_or_missing_falls_back_to_xla(monkeypatch):
    ours, ref, x, w = case("3x3_same")
    monkeypatch.setenv(onednn.ENV, "0")
    assert onednn.describe() == "XLA's own"
    text = compiled_text(ours, x, w)
    assert " convolution(" in text and TARGET not in text
    monkeypatch.delenv(onednn.ENV)
    monkeypatch.setattr(onednn, "_LIBRARY", onednn._LIBRARY.with_name("missing.so"))
    onednn._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU convolutions and batch norms use XLA's own, not oneDNN: missing.so was not built"):
            text = compiled_text(lambda x, w: ours(x, w) + ours(x, w), x, w)
            assert onednn.describe() == "XLA's own"
        assert " convolution(" in text and TARGET not in text
        assert max_relative_error(jax.jit(lambda x, w: ours(x, w))(x, w), ref(x, w)) < 1e-5
    finally:
        monkeypatch.undo()
        onednn._load.cache_clear()
    assert onednn.enabled()


def test_the_switch_holds_for_the_ops_called_directly():
    # The primitives themselves, not only the routing in `conv_general_dilated`, honour it.
    from fnlearn.ops import batch_norm

    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    scale = jnp.ones(16)

    def direct():  # a new function each time: JAX caches a function's lowering, and the switch is no part of its key
        return lambda x, w: (batch_norm.batch_norm(x.reshape(-1, 16), scale, scale, 1e-5)[0],
                             onednn.conv(x, w, (1, 1), ((1, 1), (1, 1))))

    text = compiled_text(direct(), x, w)
    assert "fnlearn_batch_norm_forward" in text and TARGET in text
    with onednn.disabled():
        text = compiled_text(direct(), x, w)
    assert "fnlearn_batch_norm_forward" not in text and TARGET not in text


def test_programs_split_over_devices_keep_lax_convolutions():
    # XLA's partitioner cannot split a custom call: it would gather the whole batch onto
    # every device. Split programs (data parallel over the 8 test devices) keep lax's.
    from fnlearn import parallel
    ours, ref, x, w = case("3x3_same")
    mesh = parallel.data_mesh()
    x8 = jax.device_put(jnp.concatenate([x] * 4), parallel.batch_sharding(mesh))
    grad = lambda conv: jax.jit(jax.grad(loss_of(conv), argnums=(0, 1)))  # noqa: E731
    text = grad(ours).lower(x8, w).compile().as_text()
    assert TARGET not in text and " convolution(" in text
    for g, h in zip(grad(ours)(x8, w), grad(ref)(x8, w)):
        assert max_relative_error(g, h) < 1e-4
    # Inside a loop too, the gradient convolutions are in the layouts XLA:CPU's Eigen
    # convolution takes (left in lax's, a loop runs them as a loop nest, many times slower).
    def in_a_loop(x, w):
        return lax.fori_loop(0, 2, lambda i, acc: acc + grad(ours)(x + i, w)[1], jnp.zeros_like(w))
    convs = [line for line in jax.jit(in_a_loop).lower(x8, w).compile().as_text().splitlines()
             if " convolution(" in line]
    assert convs and all("dim_labels=b01f_01io->b01f" in line for line in convs), convs
    # One device: oneDNN again.
    assert TARGET + "forward" in compiled_text(lambda x, w: ours(x, w), x, w)


def test_jax_export_gets_lax_convolutions():
    # An exported program must run without fnlearn's library, at any batch.
    ours, ref, x, w = case("3x3_same")
    batch, = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(lambda x: ours(x, w)))(jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype))
    assert TARGET not in exported.mlir_module()
    assert max_relative_error(exported.call(x), ref(x, w)) < 1e-5


def test_other_platforms_keep_lax_convolutions(monkeypatch):
    ours, _, x, w = case("3x3_same")
    grad = jax.grad(loss_of(ours), argnums=(0, 1))
    text = jax.jit(grad).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.convolution" in text and TARGET not in text
    # The primitives themselves lower to lax's convolutions off the CPU.
    direct = lambda x, w: onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    text = jax.jit(jax.grad(loss_of(direct), argnums=(0, 1))).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.convolution" in text and TARGET not in text
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert onednn.describe() is None  # a GPU run's summary says nothing of CPU convolutions
