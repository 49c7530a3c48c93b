"""fnlearn.ops conv, pool, gelu and flags: values and gradients against lax / flax, and which lowering runs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conv_testing import compiled_text, max_relative_error, normal
from conv_testing import conv_pair as pair
from fnlearn.models import layers
from fnlearn.ops import flags, gelu
from fnlearn.ops.pool import max_pool

# (input shape, kernel shape, strides, padding): the convs of the zoo.
CONV_CASES = {
    "3x3_same": ((2, 9, 9, 8), (3, 3, 8, 16), (1, 1), "SAME"),
    "3x3_valid": ((2, 9, 9, 8), (3, 3, 8, 16), (1, 1), "VALID"),
    "3x3_stride2": ((2, 10, 10, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),
    "1x1": ((2, 8, 8, 16), (1, 1, 16, 32), (1, 1), "VALID"),
    "1x1_stride2": ((2, 9, 9, 16), (1, 1, 16, 32), (2, 2), ((0, 0), (0, 0))),
    "1x1_same_stride2": ((2, 8, 8, 16), (1, 1, 16, 32), (2, 2), "SAME"),
    "2x2_valid_stem": ((2, 8, 8, 3), (2, 2, 3, 24), (1, 1), "VALID"),
    "7x7_stride2_stem": ((1, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
}


def conv_pair(case, dtype=jnp.float32):
    """(conv, reference conv, x, w) for a case; both convs take (x, w)."""
    return pair(*CONV_CASES[case], dtype)


def value_and_grads(conv, x, w):
    """Output and the (x, w) gradients of a fixed random projection of it, computed in float32."""
    probe = normal(2, jax.eval_shape(conv, x, w).shape)

    def loss(x, w):
        y = conv(x, w)
        return jnp.sum(y.astype(jnp.float32) * probe), y

    # One jit for value and grads: op-by-op gradients would compile every primitive.
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return (y,) + grads


def both_paths(cases):
    """(case, FNLEARN_ONEDNN) pairs for both CPU paths: oneDNN where it is built
    (tests/test_onednn.py has more) and XLA's own; a 1x1 case is a dot either way, so once."""
    return [(case, onednn) for case in cases for onednn in ("1", "0")
            if onednn == "0" or not case.startswith("1x1")]


@pytest.mark.parametrize("case, onednn", both_paths(CONV_CASES))
def test_conv_matches_lax_float32(case, onednn, monkeypatch):
    monkeypatch.setenv("FNLEARN_ONEDNN", onednn)
    ours, ref, x, w = conv_pair(case)
    for got, want in zip(value_and_grads(ours, x, w), value_and_grads(ref, x, w)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert max_relative_error(got, want) < 1e-4


@pytest.mark.parametrize("case, onednn", both_paths(["3x3_same", "1x1", "1x1_stride2"]))
def test_conv_matches_lax_bfloat16(case, onednn, monkeypatch):
    monkeypatch.setenv("FNLEARN_ONEDNN", onednn)
    ours, ref, x, w = conv_pair(case, jnp.bfloat16)
    for got, want in zip(value_and_grads(ours, x, w), value_and_grads(ref, x, w)):
        assert got.dtype == want.dtype == jnp.bfloat16
        assert max_relative_error(got, want) < 2e-2  # bf16 keeps 8 bits: ~4e-3 per rounding


def test_pointwise_conv_is_a_dot_on_cpu():
    ours, _, x, w = conv_pair("1x1_stride2")
    loss = lambda x, w: jnp.sum(ours(x, w) ** 2)  # noqa: E731
    for text in (compiled_text(ours, x, w), compiled_text(jax.grad(loss, argnums=(0, 1)), x, w)):
        assert " dot(" in text
        assert "convolution(" not in text


def test_spatial_conv_stays_native_on_cpu_without_onednn(monkeypatch):
    monkeypatch.setenv("FNLEARN_ONEDNN", "0")  # with oneDNN: tests/test_onednn.py
    ours, _, x, w = conv_pair("3x3_same")
    assert "convolution(" in compiled_text(ours, x, w)


def test_other_backends_get_the_native_conv():
    # Lowering for CUDA needs no GPU: the platform branch is chosen at lowering time.
    ours, _, x, w = conv_pair("1x1_stride2")
    loss = lambda x, w: jnp.sum(ours(x, w) ** 2)  # noqa: E731
    for fn in (ours, jax.grad(loss, argnums=(0, 1))):
        text = jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.convolution" in text
        assert "stablehlo.dot_general" not in text
    cpu_text = jax.jit(ours).trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
    assert "stablehlo.dot_general" in cpu_text and "stablehlo.convolution" not in cpu_text


@pytest.mark.parametrize("onednn", ["1", "0"])
@pytest.mark.parametrize("case", ["1x1", "3x3_same", "3x3_stride2"])
def test_conv_supports_forward_mode(case, onednn, monkeypatch):
    monkeypatch.setenv("FNLEARN_ONEDNN", onednn)
    ours, ref, x, w = conv_pair(case)
    dx, dw = normal(3, x.shape), normal(4, w.shape)
    got = jax.jvp(ours, (x, w), (dx, dw))[1]
    want = jax.jvp(ref, (x, w), (dx, dw))[1]
    assert max_relative_error(got, want) < 1e-4
    # Forward over reverse: a Hessian-vector product in the kernel.
    hvp = lambda conv: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w)))), (w,), (dw,))[1]  # noqa: E731
    assert max_relative_error(hvp(ours), hvp(ref)) < 1e-4


EIGEN_LAYOUT = "dim_labels=b01f_01io->b01f"  # NHWC input, HWIO kernel, NHWC output


@pytest.mark.parametrize("case", ["3x3_same", "3x3_stride2"])
def test_gradient_convs_in_a_loop_are_in_eigen_layouts(case, monkeypatch):
    monkeypatch.setenv("FNLEARN_ONEDNN", "0")  # XLA's own convolutions, where oneDNN is off or missing
    # XLA:CPU moves convolutions into the layouts its Eigen kernels take only at a
    # program's top level; inside a loop body, lax's own kernel gradient stays
    # f01b_i01o->01bf and runs as a loop nest, many times slower.
    ours, ref, x, w = conv_pair(case)

    def grads_in_a_loop(conv):
        def body(i, acc):
            gx, gw = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x + i, w)
            return acc[0] + gx, acc[1] + gw
        return lambda x, w: lax.fori_loop(0, 2, body, (jnp.zeros_like(x), jnp.zeros_like(w)))

    convs = [line for line in compiled_text(grads_in_a_loop(ours), x, w).splitlines() if " convolution(" in line]
    assert len(convs) == 3  # forward, input grad, kernel grad
    assert all(EIGEN_LAYOUT in line for line in convs), convs
    native = compiled_text(grads_in_a_loop(ref), x, w)
    assert any(" convolution(" in line and EIGEN_LAYOUT not in line for line in native.splitlines())
    for got, want in zip(jax.jit(grads_in_a_loop(ours))(x, w), jax.jit(grads_in_a_loop(ref))(x, w)):
        assert max_relative_error(got, want) < 1e-4


@pytest.mark.parametrize("kernel_size, strides", [((3, 3), 1), ((1, 1), 2)])
def test_layers_conv_is_flax_conv(kernel_size, strides):
    x = normal(0, (2, 8, 8, 4))
    ours, flax_conv = layers.Conv(6, kernel_size, strides), nn.Conv(6, kernel_size, strides)
    variables = flax_conv.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    assert max_relative_error(ours.apply(variables, x), flax_conv.apply(variables, x)) < 1e-5


class _AnySizeNet(nn.Module):
    """The convolutions and pool of the zoo's nets, for images of any size."""

    @nn.compact
    def __call__(self, x):
        x = layers.Conv(8, (3, 3), strides=2)(x)                 # "SAME", stride 2: padding depends on the size
        x = layers.Conv(8, (3, 3), padding="VALID")(x)
        x = layers.max_pool(x, (2, 2), (2, 2))
        return layers.Conv(4, (1, 1))(x)


def test_export_with_symbolic_image_sizes_matches_flax():
    # jax.export with a symbolic height and width (yolo takes any multiple of 32): the
    # conv and pool lowerings leave such shapes to lax, and flax's ops give the same.
    net, x = _AnySizeNet(), normal(0, (2, 20, 24, 3))
    variables = net.init(jax.random.key(0), x)
    b, h, w = jax.export.symbolic_shape("b, h, w")
    spec = jax.ShapeDtypeStruct((b, h, w, 3), x.dtype)
    exported = jax.export.export(jax.jit(lambda x: net.apply(variables, x)))(spec)
    for shape in [(2, 20, 24, 3), (1, 33, 17, 3)]:
        x = normal(1, shape)
        want = jax.jit(lambda x: net.apply(variables, x))(x)
        assert max_relative_error(exported.call(x), want) < 1e-5


def pool_grad(pool, x, window, strides):
    probe = normal(4, jax.eval_shape(lambda x: pool(x, window, strides), x).shape)
    return jax.jit(jax.grad(lambda x: jnp.sum(pool(x, window, strides) * probe)))(x)


@pytest.mark.parametrize("shape, window, strides", [
    ((2, 8, 8, 3), (2, 2), (2, 2)),      # FastNet's pool
    ((2, 15, 15, 3), (2, 2), (2, 2)),    # odd size: VALID drops the last row and column
    ((2, 10, 11, 3), (3, 2), (3, 2)),    # other windows per axis, both cropped
    ((7, 3), (2,), (2,)),                # 1-D, no batch dim
    ((2, 3, 5, 6, 7, 2), (2, 3, 2), (2, 3, 2)),  # 3-D, two batch dims
    ((2, 1, 4, 3), (2, 2), (2, 2)),      # smaller than a window: an empty output
    ((7, 7, 3), (2, 2), (2, 2)),         # no batch dim
    ((2, 9, 9, 3), (3, 3), (3, 3)),
    ((2, 9, 9, 3), (3, 3), (2, 2)),      # overlapping windows: nn.max_pool itself
])
def test_max_pool_matches_flax(shape, window, strides):
    x = normal(0, shape)
    np.testing.assert_array_equal(max_pool(x, window, strides), nn.max_pool(x, window, strides))
    np.testing.assert_array_equal(pool_grad(max_pool, x, window, strides),
                                  pool_grad(nn.max_pool, x, window, strides))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_ties_route_gradient_like_flax(dtype):
    # Few distinct values: most windows hold tied maxima; the first in row-major order
    # gets the gradient, as in select-and-scatter. bfloat16 is widened inside the pool.
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 3, (2, 9, 9, 3)), dtype)
    np.testing.assert_array_equal(max_pool(x, (2, 2), (2, 2)), nn.max_pool(x, (2, 2), (2, 2)))
    np.testing.assert_array_equal(pool_grad(max_pool, x, (2, 2), (2, 2)),
                                  pool_grad(nn.max_pool, x, (2, 2), (2, 2)))


def test_max_pool_second_derivative_keeps_ties_whole():
    # A Hessian-vector product (forward over reverse) differentiates the pool's own
    # derivative rule: a tie must still send everything to its first maximum.
    x = jnp.asarray([[[[1.0], [1.0]], [[0.0], [0.0]]]])
    tangent = jnp.zeros_like(x).at[0, 0, 0, 0].set(1.0)

    def hvp(pool):
        grad = jax.grad(lambda x: jnp.sum(pool(x, (2, 2), (2, 2)) ** 2))
        return jax.jit(lambda x, t: jax.jvp(grad, (x,), (t,))[1])(x, tangent)
    np.testing.assert_array_equal(hvp(max_pool), hvp(nn.max_pool))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="other backends run nn.max_pool itself")
def test_max_pool_nan_propagates_and_takes_the_gradient():
    # A diverged window: the output is NaN, as nn.max_pool's, and its gradient goes to
    # the window's first NaN (row-major), whatever the other values.
    x = np.zeros((1, 2, 6, 1), np.float32)
    x[0, :, 0:2, 0] = [[1, np.nan], [5, np.nan]]     # NaN after a larger value
    x[0, :, 2:4, 0] = [[np.nan, 7], [np.nan, 1]]     # NaN first
    x[0, :, 4:6, 0] = [[3, 4], [9, 2]]               # no NaN
    out = max_pool(jnp.asarray(x), (2, 2), (2, 2))
    np.testing.assert_array_equal(out, nn.max_pool(x, (2, 2), (2, 2)))
    grad = jax.grad(lambda x: jnp.sum(max_pool(x, (2, 2), (2, 2)) * jnp.asarray([1.0, 2.0, 3.0])[:, None]))(x)
    want = np.zeros_like(x)
    want[0, 0, 1, 0], want[0, 0, 2, 0], want[0, 1, 4, 0] = 1, 2, 3
    np.testing.assert_array_equal(grad, want)


def test_max_pool_bfloat16_and_forward_mode():
    x = jnp.asarray(normal(0, (2, 8, 8, 3)))
    pool = lambda x: max_pool(x, (2, 2), (2, 2))  # noqa: E731
    assert pool(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    tangent = normal(1, x.shape)
    np.testing.assert_array_equal(jax.jvp(pool, (x,), (tangent,))[1],
                                  jax.jvp(lambda x: nn.max_pool(x, (2, 2), (2, 2)), (x,), (tangent,))[1])


def test_max_pool_gradient_avoids_select_and_scatter_on_cpu():
    x = jnp.ones((2, 8, 8, 3))
    grad = jax.grad(lambda x: jnp.sum(max_pool(x, (2, 2), (2, 2))))
    assert "select-and-scatter" not in compiled_text(grad, x)
    cuda = jax.jit(grad).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.select_and_scatter" in cuda


def test_gelu_is_exact_gelu_in_one_fusion():
    x = jnp.asarray(normal(0, (4, 5, 5, 8)) * 3)
    exact = lambda x: jax.nn.gelu(x, approximate=False)  # noqa: E731
    np.testing.assert_allclose(gelu(x), exact(x), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * x))(x)  # noqa: E731
    np.testing.assert_allclose(grad(gelu), grad(exact), rtol=1e-5, atol=1e-6)
    assert gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    # The speed-up: erf, not erfc, so XLA:CPU fuses the whole forward into one loop.
    hlo = compiled_text(gelu, x)
    assert hlo[hlo.index("ENTRY"):].count("fusion(") == 1


def test_xla_flags_are_added_and_user_settings_win():
    name, value = next(iter(flags.CPU_FLAGS.items()))
    combined = flags.xla_flags("--xla_force_host_platform_device_count=4", jaxlib="0.10.2")
    assert combined.split() == ["--xla_force_host_platform_device_count=4", f"--{name}={value}"]
    assert flags.xla_flags(f"--{name}=individual_dot", jaxlib="0.10.2") == f"--{name}=individual_dot"
    environ = {}
    flags.apply(environ)
    flags.apply(environ)  # idempotent
    assert environ["XLA_FLAGS"] == flags.xla_flags()  # this jaxlib's: the flags, or none on an unmeasured one
    # A jaxlib they were not measured on may not know them, and XLA aborts on an unknown flag.
    assert flags.xla_flags("--xla_force_host_platform_device_count=4", jaxlib="0.11.0") == \
        "--xla_force_host_platform_device_count=4"
