"""FastNet (airbench94's net): size, whitening, Dirac init, BN momentum, logit scale, bf16, torch parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlearn.models
from fnlearn.models.fastnet import (FastNet, FastNetTiny, dirac_init, image_patches, init_fastnet,
                                    whitening_kernel, with_whitening)
from fnlearn.recipes.cifar import param_labels  # the recipe's optimizer groups, on FastNet's params


def correlated_images(n=16, size=12, seed=0):
    """(n, size, size, 3) images with correlated channels and neighbouring pixels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size + 1, size + 1, 3)).astype(np.float32)
    x = x[:, 1:, 1:] + 0.7 * x[:, :-1, :-1]  # spatial correlation
    mix = np.array([[1.0, 0.6, 0.3], [0.0, 1.0, 0.5], [0.0, 0.0, 0.8]], np.float32)
    return x @ mix + 0.3  # channel correlation and a non-zero mean


@pytest.fixture(scope="module")
def tiny():
    """A FastNetTiny with its whitening stem set, the images it was set from, its variables."""
    model = FastNetTiny()
    images = jnp.asarray(correlated_images(n=4, size=32))
    return model, images, init_fastnet(model, jax.random.key(0), images)


def test_param_count():
    # whiten 2*2*3*24 + 24 bias                                  = 312
    # block1 3*3*24*64 + 3*3*64*64 + 2*64 (BN biases, no scales) = 13,824 + 36,864 + 128 = 50,816
    # block2 3*3*64*256 + 3*3*256*256 + 2*256                    = 147,456 + 589,824 + 512 = 737,792
    # block3 3*3*256*256 + 3*3*256*256 + 2*256                   = 1,180,160
    # fc 256*10, no bias                                         = 2,560
    # total 312 + 50,816 + 737,792 + 1,180,160 + 2,560           = 1,971,640
    variables = jax.eval_shape(FastNet().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 1_971_640


def test_output_shape_and_param_groups(tiny):
    model, x, variables = tiny
    assert model.apply(variables, x).shape == (4, 10)
    labels = param_labels(variables["params"])
    assert labels["whiten"] == {"kernel": "whiten_kernel", "bias": "whiten_bias"}
    assert labels["block2"]["bn1"]["bias"] == "bn_bias"
    assert labels["block2"]["conv1"]["kernel"] == "other" and labels["fc"]["kernel"] == "other"
    assert "scale" not in variables["params"]["block1"]["bn1"]  # scale-free BatchNorm


@pytest.mark.parametrize("eps, atol", [(1e-7, 2e-3), (5e-4, 1e-2)])
def test_whitening_kernel_whitens_patches(eps, atol):
    images = correlated_images()
    kernel = whitening_kernel(images, eps=eps)
    assert kernel.shape == (2, 2, 3, 24) and kernel.dtype == jnp.float32
    # Apply it as the conv does, so the test also checks the (h, w, c) patch layout.
    out = jax.lax.conv_general_dilated(jnp.asarray(images), kernel, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision="highest").reshape(-1, 24)
    np.testing.assert_allclose(out[:, 12:], -out[:, :12], rtol=1e-6, atol=1e-6)
    second_moment = out[:, :12].T @ out[:, :12] / out.shape[0]
    # eps shrinks each direction by lambda / (lambda + eps); here every lambda >> eps.
    np.testing.assert_allclose(second_moment, np.eye(12), atol=atol)
    raw = image_patches(jnp.asarray(images))
    assert not np.allclose(raw.T @ raw / raw.shape[0], np.eye(12), atol=0.1)  # it did something


def test_init_fastnet_sets_the_stem(tiny):
    model, images, variables = tiny
    np.testing.assert_allclose(variables["params"]["whiten"]["kernel"], whitening_kernel(images))
    np.testing.assert_array_equal(variables["params"]["whiten"]["bias"], np.zeros(24))
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    (stem,) = state["intermediates"]["whiten"]["__call__"]
    assert stem.shape == (4, 31, 31, 24)  # 2x2 'VALID': 32 -> 31
    stem = stem.reshape(-1, 24)[:, :12]
    np.testing.assert_allclose(stem.T @ stem / stem.shape[0], np.eye(12), atol=1e-2)


def test_registry_data_init_sets_the_whitening_kernel(tiny):
    model, images, _ = tiny
    variables = model.init(jax.random.key(0), images[:1])
    snapshot = jax.tree.map(np.array, variables)
    new = fnlearn.models.data_init("fastnet_tiny")(variables, images)
    old_kernel, kernel = variables["params"]["whiten"]["kernel"], new["params"]["whiten"]["kernel"]
    assert not np.allclose(kernel, old_kernel)  # the random init was replaced
    np.testing.assert_array_equal(kernel, with_whitening(variables, images)["params"]["whiten"]["kernel"])
    np.testing.assert_allclose(kernel, whitening_kernel(images), rtol=1e-6)

    def without_kernel(v):
        return {**v, "params": {**v["params"], "whiten": {"bias": v["params"]["whiten"]["bias"]}}}

    # The input variables are left as they were, and nothing but the kernel changes.
    jax.tree.map(np.testing.assert_array_equal, variables, snapshot)
    jax.tree.map(np.testing.assert_array_equal, without_kernel(new), without_kernel(snapshot))


@pytest.mark.parametrize("c_in, c_out", [(4, 6), (6, 4)])
def test_dirac_init(c_in, c_out):
    kernel = dirac_init(jax.random.key(0), (3, 3, c_in, c_out))
    n = min(c_in, c_out)
    expected = np.zeros((3, 3, c_in, n), np.float32)
    expected[1, 1] = np.eye(c_in, n)
    np.testing.assert_array_equal(kernel[..., :n], expected)
    rest = kernel[..., n:]
    assert rest.size == 0 or (np.all(rest != 0) and np.all(np.abs(rest) <= (9 * c_in) ** -0.5))
    # As a 'SAME' conv, the first n outputs reproduce the first n input channels.
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, c_in))
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y[..., :n], x[..., :n], rtol=1e-6, atol=1e-6)


def test_block_convs_use_dirac_init(tiny):
    _, _, variables = tiny
    kernel = variables["params"]["block2"]["conv1"]["kernel"]  # (3, 3, 8, 16)
    np.testing.assert_array_equal(kernel[1, 1, :, :8], np.eye(8))
    np.testing.assert_array_equal(kernel[0, 0, :, :8], np.zeros((8, 8)))


def test_batchnorm_momentum_follows_airbench(tiny):
    # airbench's batchnorm_momentum=0.6 reaches torch as momentum=1-0.6, so running
    # = 0.6 * running + 0.4 * batch: from running mean 0 and var 1, one step gives
    # mean = 0.4 * batch_mean and var = 0.6 + 0.4 * batch_var.
    model, x, variables = tiny
    _, state = model.apply(variables, x, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"])
    (conv2_out,) = state["intermediates"]["block1"]["conv2"]["__call__"]  # input of block1/bn2
    stats = state["batch_stats"]["block1"]["bn2"]
    np.testing.assert_allclose(stats["mean"], 0.4 * conv2_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.6 + 0.4 * conv2_out.var(axis=(0, 1, 2)), rtol=1e-4)


def test_logits_are_the_head_output_over_nine(tiny):
    model, x, variables = tiny
    logits, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    (head,) = state["intermediates"]["fc"]["__call__"]
    assert np.abs(head).max() > 0
    np.testing.assert_allclose(logits, head / 9, rtol=1e-6)


def test_bf16_forward_with_float32_params(tiny):
    _, x, variables = tiny
    model = FastNetTiny(dtype=jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):  # no silent promotion anywhere in the net
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)
        # Same parameter tree as the float32 model, so its variables serve.
        logits, state = model.apply(variables, x, train=True, capture_intermediates=True,
                                    mutable=["batch_stats", "intermediates"])
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert {p.dtype for p in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}
    assert state["intermediates"]["block1"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
    assert state["intermediates"]["block3"]["conv2"]["__call__"][0].dtype == jnp.bfloat16
    # The whitening stem and the head compute in float32 (they amplify, or are, what bf16 would round).
    assert state["intermediates"]["whiten"]["__call__"][0].dtype == jnp.float32
    assert logits.dtype == jnp.float32 and logits.shape == (4, 10)
    assert np.all(np.isfinite(logits))


def test_matches_airbench_in_torch(torch, tiny):
    from benchmarks.torch_models import TorchFastNet, torch_state_dict  # imports torch: after the fixture

    model, x, variables = tiny
    # Non-zero biases, so the parity also covers the whitening and BatchNorm biases.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.1 * jnp.sin(jnp.arange(p.size, dtype=p.dtype) + 1.0).reshape(p.shape)
        if path[-1].key == "bias" else p, variables["params"])
    variables = {**variables, "params": params}
    net = TorchFastNet(model.widths)
    missing, unexpected = net.load_state_dict(torch_state_dict(variables), strict=False)
    # Only the BN weights (frozen at their init, 1) and counters come from torch itself.
    assert not unexpected and all(k.endswith(("bn1.weight", "bn2.weight", "num_batches_tracked"))
                                  for k in missing)
    x_torch = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    with torch.no_grad():
        net.train()
        train_logits = net(x_torch)  # also updates torch's running statistics
        net.eval()
        eval_logits = net(x_torch)

    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, train_logits.numpy(), rtol=1e-4, atol=1e-5)
    # One update of the running means agrees with torch's momentum=1-0.6.
    np.testing.assert_allclose(state["batch_stats"]["block3"]["bn2"]["mean"],
                               net.block3.bn2.running_mean.numpy(), rtol=1e-4, atol=1e-6)
    # Eval from torch's running statistics: its variances are unbiased, flax's biased.
    stats = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(net.get_buffer(
            ".".join(k.key for k in path[:-1]) + ".running_" + path[-1].key).numpy()),
        state["batch_stats"])
    eval_out = model.apply({"params": params, "batch_stats": stats}, x)
    np.testing.assert_allclose(eval_out, eval_logits.numpy(), rtol=1e-4, atol=1e-5)
