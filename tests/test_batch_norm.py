"""oneDNN's training-mode batch norm (fnlearn.ops.batch_norm, layers.BatchNorm): values and
every kind of derivative against the textbook formula, the layer against flax's, and the
fallbacks to flax's where the call cannot go.

Skipped where the library is not built, unless FNLEARN_REQUIRE_ONEDNN=1 (CI)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conv_testing import compiled_text, max_relative_error
from fnlearn import parallel
from fnlearn.models import layers
from fnlearn.ops import batch_norm, onednn

TARGET = "fnlearn_batch_norm_"
EPS = 1e-5

if not onednn.enabled():
    if os.environ.get("FNLEARN_REQUIRE_ONEDNN") == "1":
        raise RuntimeError("FNLEARN_REQUIRE_ONEDNN=1 but oneDNN is off (see test_onednn.py)")
    pytest.skip("the oneDNN library is not built here", allow_module_level=True)


def textbook(x, scale, shift, epsilon=EPS):
    """Batch norm over all axes but the last, in float32, differentiated by JAX."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean, variance = xf.mean(axes), xf.var(axes)
    return ((xf - mean) / jnp.sqrt(variance + epsilon) * scale + shift).astype(x.dtype), mean, variance


def ours(x, scale, shift):
    return batch_norm.batch_norm(x, scale, shift, EPS)


def data(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 1, dtype)
    scale = jnp.asarray(1 + 0.3 * rng.standard_normal(shape[-1]), jnp.float32)
    return x, scale, jnp.asarray(0.5 * rng.standard_normal(shape[-1]), jnp.float32)


def loss_of(bn):
    # Not a plain sum: the gradient of sum(y) with respect to x is 0.
    return lambda x, scale, shift: jnp.sum(jnp.sin(3 * bn(x, scale, shift)[0].astype(jnp.float32)))


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(4, 5, 6, 16), (33, 32), (5, 3, 8)])
def test_values_and_gradients_match_the_textbook_formula(shape, dtype, tolerance):
    x, scale, shift = data(shape, dtype)
    for got, want in zip(jax.jit(ours)(x, scale, shift), textbook(x, scale, shift)):
        assert got.dtype == want.dtype and max_relative_error(got, want) < tolerance
    grads = lambda bn: jax.jit(jax.grad(loss_of(bn), argnums=(0, 1, 2)))(x, scale, shift)  # noqa: E731
    for got, want in zip(grads(ours), grads(textbook)):
        assert got.dtype == want.dtype and max_relative_error(got, want) < tolerance
    # oneDNN where it has jitted kernels: channel counts of 16s, bf16 on AVX-512; lax elsewhere.
    text = compiled_text(jax.grad(loss_of(ours), argnums=(0, 1, 2)), x, scale, shift)
    in_onednn = shape[-1] % 16 == 0 and (dtype == jnp.float32 or onednn.native_bfloat16("batch_norm"))
    assert (TARGET + "forward" in text) == (TARGET + "backward" in text) == in_onednn


def test_forward_mode_second_order_vmap_and_op_by_op():
    x, scale, shift = data((6, 7, 16))
    primals = (x, scale, shift)
    tangents = data((6, 7, 16), seed=1)
    # Forward mode; the tangents of the statistics too.
    for got, want in zip(jax.jvp(ours, primals, tangents)[1], jax.jvp(textbook, primals, tangents)[1]):
        assert max_relative_error(got, want) < 1e-4
    # Forward over reverse (a Hessian-vector product) and reverse over reverse.
    hvp = lambda bn: jax.jit(lambda *p: jax.jvp(jax.grad(loss_of(bn), argnums=(0, 1, 2)), p, tangents)[1])(*primals)  # noqa: E731
    for got, want in zip(hvp(ours), hvp(textbook)):
        assert max_relative_error(got, want) < 1e-3

    def grad_of_grad_norm(bn):
        norm = lambda *p: sum(jnp.sum(g ** 2) for g in jax.grad(loss_of(bn), argnums=(0, 1, 2))(*p))  # noqa: E731
        return jax.jit(jax.grad(norm, argnums=(0, 1, 2)))(*primals)

    for got, want in zip(grad_of_grad_norm(ours), grad_of_grad_norm(textbook)):
        assert max_relative_error(got, want) < 1e-3
    # vmap: each mapped slice has its own statistics.
    per_slice = lambda bn: jax.vmap(jax.grad(loss_of(bn)), in_axes=(0, None, None))(*primals)  # noqa: E731
    assert max_relative_error(per_slice(ours), per_slice(textbook)) < 1e-4
    with jax.disable_jit():  # the primitives' own impl must not recurse
        assert max_relative_error(jax.grad(loss_of(ours))(*primals), jax.grad(loss_of(textbook))(*primals)) < 1e-4
    with pytest.raises(TypeError, match=r"\(M, C\) float32 or bfloat16 activations"):
        ours(x.astype(jnp.float16), scale, shift)
    # An empty batch: the lax reference (no statistics), as flax gives.
    assert np.isnan(jax.jit(ours)(x[:0], scale, shift)[1]).all()


def layer_loss(module, variables, x):
    def loss(params):
        y, updates = module.apply({**variables, "params": params}, x, use_running_average=False,
                                  mutable=["batch_stats"])
        return jnp.sum(jnp.sin(3 * y.astype(jnp.float32))), (y, updates["batch_stats"])
    return loss


@pytest.mark.parametrize("use_scale, use_bias, param_dtype", [(True, True, jnp.float32), (False, True, jnp.float32),
                                                              (True, False, jnp.bfloat16)])
def test_the_layer_trains_as_flax_batch_norm_does(use_scale, use_bias, param_dtype):
    # A bf16 BatchNorm (the precision policy's): oneDNN where it has bf16 kernels, flax's elsewhere.
    x = data((8, 6, 6, 16), jnp.bfloat16)[0]
    kwargs = dict(momentum=0.9, use_scale=use_scale, use_bias=use_bias, dtype=jnp.bfloat16, param_dtype=param_dtype)
    ours_bn, flax_bn = layers.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
    variables = ours_bn.init(jax.random.PRNGKey(0), x, use_running_average=False)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, flax_bn.init(jax.random.PRNGKey(0), x, use_running_average=False))
    params = jax.tree.map(lambda p: p + 0.2 * jnp.arange(p.size, dtype=p.dtype) / p.size, variables["params"])
    variables = {**variables, "params": params}
    got = jax.jit(jax.value_and_grad(layer_loss(ours_bn, variables, x), has_aux=True))(params)
    with jax.numpy_dtype_promotion("standard"):  # flax's own BatchNorm mixes dtypes
        want = jax.jit(jax.value_and_grad(layer_loss(flax_bn, variables, x), has_aux=True))(params)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == h.dtype and max_relative_error(g, h) < 3e-2
    text = compiled_text(jax.grad(lambda p: layer_loss(ours_bn, variables, x)(p)[0]), params)
    assert (TARGET + "backward" in text) == onednn.native_bfloat16("batch_norm")
    assert onednn.describe().endswith("bf16 batch norms in " + ("oneDNN" if TARGET + "backward" in text else "XLA"))
    # float32, inference and the cases oneDNN's does not cover keep flax's.
    train = lambda bn, x, **kw: bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"], **kw)  # noqa: E731
    f32 = layers.BatchNorm(momentum=0.9, use_scale=use_scale, use_bias=use_bias, param_dtype=param_dtype)
    assert TARGET not in compiled_text(lambda x: train(f32, x), x.astype(jnp.float32))
    assert TARGET not in compiled_text(lambda x: ours_bn.apply(variables, x, use_running_average=True), x)
    mask = np.arange(8)[:, None, None, None] < 6  # the statistics of 6 of the 8 images
    assert TARGET not in compiled_text(lambda x: train(ours_bn, x, mask=mask), x)
    with jax.numpy_dtype_promotion("standard"):
        assert jnp.array_equal(train(ours_bn, x, mask=mask)[0], train(flax_bn, x, mask=mask)[0])
    channels_first = layers.BatchNorm(axis=1, **kwargs)
    assert TARGET not in compiled_text(lambda x: train(channels_first, x), x.transpose(0, 3, 1, 2))


def test_steps_inside_scan_with_donated_state_match_flax():
    x = data((4, 5, 5, 16), jnp.bfloat16)[0]
    bn = layers.BatchNorm(momentum=0.5, dtype=jnp.bfloat16)
    variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=False)

    def run(module):
        def step(variables, i):
            (_, (_, stats)), grads = jax.value_and_grad(layer_loss(module, variables, x + i), has_aux=True)(
                variables["params"])
            params = jax.tree.map(lambda p, g: p - 0.002 * g, variables["params"], grads)
            return {"params": params, "batch_stats": stats}, None
        scan = jax.jit(lambda v: lax.scan(step, v, jnp.arange(3, dtype=jnp.bfloat16))[0], donate_argnums=0)
        with jax.numpy_dtype_promotion("standard"):
            text = scan.lower(variables).compile().as_text()
            return scan(jax.tree.map(jnp.copy, variables)), text

    (got, text), (want, _) = run(bn), run(nn.BatchNorm(momentum=0.5, dtype=jnp.bfloat16))
    assert (TARGET + "backward" in text) == onednn.native_bfloat16("batch_norm")
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert max_relative_error(g, h) < 2e-2


def test_export_split_programs_and_other_platforms_keep_flax(monkeypatch):
    x, scale, shift = data((8, 4, 4, 16))
    # An exported program must run without fnlearn's library.
    exported = jax.export.export(jax.jit(ours))(x, scale, shift)
    assert TARGET not in exported.mlir_module()
    assert max_relative_error(exported.call(x, scale, shift)[0], textbook(x, scale, shift)[0]) < 1e-5
    # XLA's partitioner cannot split a custom call: a batch split over the test devices keeps lax.
    mesh = parallel.data_mesh()
    split = jax.device_put(x, parallel.batch_sharding(mesh))
    grad = jax.jit(jax.grad(loss_of(ours), argnums=(0, 1, 2)))
    assert TARGET not in grad.lower(split, scale, shift).compile().as_text()
    assert TARGET in grad.lower(x, scale, shift).compile().as_text()  # one device: oneDNN
    for got, want in zip(grad(split, scale, shift), jax.grad(loss_of(textbook), argnums=(0, 1, 2))(x, scale, shift)):
        assert max_relative_error(got, want) < 1e-4
    # Another platform gets flax's formula (the primitives would lower to lax there too: look for
    # them by name), which matches flax's BatchNorm.
    xb = x.astype(jnp.bfloat16)
    train = lambda x, s, b: batch_norm.train_batch_norm(x, s, b, EPS, jnp.bfloat16)  # noqa: E731
    lowered = lambda fn: jax.jit(fn).trace(xb, scale, shift).lower(lowering_platforms=("cuda",)).as_text(  # noqa: E731
        debug_info=True)
    assert "batch_norm_forward" in lowered(lambda x, s, b: batch_norm.batch_norm(x, s, b, EPS))
    assert "batch_norm_forward" not in lowered(train)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.5, epsilon=EPS, dtype=jnp.bfloat16)
    variables = {"params": {"scale": scale, "bias": shift},
                 "batch_stats": {"mean": jnp.zeros(16), "var": jnp.ones(16)}}
    with jax.numpy_dtype_promotion("standard"):
        want, stats = flax_bn.apply(variables, xb, mutable=["batch_stats"])
        got = batch_norm._flax_formula(xb, scale, shift, EPS, jnp.bfloat16, fast_variance=True)
    assert jnp.array_equal(got[0], want)
    assert max_relative_error(0.5 * got[1], stats["batch_stats"]["mean"]) < 1e-6
    assert max_relative_error(0.5 + 0.5 * got[2], stats["batch_stats"]["var"]) < 1e-6
    # The layer in training under export, at any batch: flax's.
    bn = layers.BatchNorm(dtype=jnp.bfloat16)
    variables = bn.init(jax.random.PRNGKey(0), xb, use_running_average=False)
    batch, = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(lambda x: bn.apply(variables, x, use_running_average=False,
                                                            mutable=["batch_stats"])))(
        jax.ShapeDtypeStruct((batch, *xb.shape[1:]), xb.dtype))
    assert TARGET not in exported.mlir_module() and exported.call(xb[:3])[0].shape == (3, 4, 4, 16)
    # Switched off: flax's everywhere.
    monkeypatch.setenv(onednn.ENV, "0")
    assert TARGET not in compiled_text(lambda x: bn.init_with_output(jax.random.PRNGKey(0), x, use_running_average=False),
                                       xb)
