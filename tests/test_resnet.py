"""ResNet: parameter counts, stems, dtype policy, BatchNorm updates, parity with a torch ResNet."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlearn.models.resnet import (Bottleneck, ResNet, ResNet18, ResNet18ImageNet,
                                   ResNet50ImageNet, ResNetTiny)


def count_params(model, shape):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    return sum(p.size for p in jax.tree.leaves(variables["params"]))


def test_resnet18_cifar_param_count():
    # stem conv 3*3*3*64 = 1,728; bn1 2*64 = 128                                   -> 1,856
    # layer1: 2 blocks * (2 * 3*3*64*64 + 2 * 2*64)                                -> 147,968
    # layer2: 3*3*64*128 + 3*3*128*128 + 2*256 + 1*1*64*128 + 256 = 230,144
    #         + 2 * 3*3*128*128 + 2*256 = 295,424                                  -> 525,568
    # layer3: 3*3*128*256 + 3*3*256*256 + 2*512 + 128*256 + 512 = 919,040
    #         + 2 * 3*3*256*256 + 2*512 = 1,180,672                                -> 2,099,712
    # layer4: 3*3*256*512 + 3*3*512*512 + 2*1024 + 256*512 + 1024 = 3,673,088
    #         + 2 * 3*3*512*512 + 2*1024 = 4,720,640                               -> 8,393,728
    # fc 512*10 + 10                                                               -> 5,130
    # 1,856 + 147,968 + 525,568 + 2,099,712 + 8,393,728 + 5,130 = 11,173,962 (batch_stats not counted)
    assert count_params(ResNet18(), (1, 32, 32, 3)) == 11_173_962


def test_imagenet_variants_match_torchvision_param_counts():
    # torchvision.models.resnet18() / resnet50() report 11,689,512 and 25,557,032.
    assert count_params(ResNet18ImageNet(num_classes=1000), (1, 224, 224, 3)) == 11_689_512
    assert count_params(ResNet50ImageNet(num_classes=1000), (1, 224, 224, 3)) == 25_557_032


@pytest.fixture(scope="module")
def tiny():
    """A float32 ResNetTiny (CIFAR stem), a small batch and its initial variables."""
    model = ResNetTiny()
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    return model, x, model.init(jax.random.key(0), x)


@pytest.mark.parametrize("stem, size, first_stage_size", [("cifar", 16, 16), ("imagenet", 32, 8)])
def test_stem_output_shapes(stem, size, first_stage_size):
    model = ResNetTiny(stem=stem)
    x = jnp.ones((2, size, size, 3))
    variables = model.init(jax.random.key(0), x)
    logits, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    assert logits.shape == (2, 10)
    (stage1,) = state["intermediates"]["layer1_0"]["__call__"]
    (stage2,) = state["intermediates"]["layer2_0"]["__call__"]
    assert stage1.shape == (2, first_stage_size, first_stage_size, 8)  # imagenet stem: /2 conv, /2 pool
    assert stage2.shape == (2, first_stage_size // 2, first_stage_size // 2, 16)


def test_bottleneck_expands_channels_by_four():
    model = ResNet(stage_sizes=(1, 1), block_cls=Bottleneck, width=4)
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    logits, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    assert logits.shape == (2, 10)
    assert state["intermediates"]["layer2_0"]["__call__"][0].shape == (2, 8, 8, 32)
    # The first block already changes 4 -> 16 channels, so it needs a projection shortcut.
    assert variables["params"]["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 4, 16)


def test_bf16_policy_keeps_params_float32(tiny):
    _, x, variables = tiny
    model = ResNetTiny(dtype=jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):  # no silent promotion anywhere in the net
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)
        # Same parameter tree as the float32 model, so its variables serve.
        logits, state = model.apply(variables, x, train=True, capture_intermediates=True,
                                    mutable=["batch_stats", "intermediates"])
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert logits.dtype == jnp.bfloat16
    assert state["intermediates"]["layer1_0"]["__call__"][0].dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}


def test_train_updates_batch_stats_with_torch_momentum(tiny):
    model, x, variables = tiny
    _, state = model.apply(variables, x, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"])
    (stem_out,) = state["intermediates"]["conv1"]["__call__"]
    # torch momentum 0.1: running = 0.9 * running + 0.1 * batch, from running mean 0.
    np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"],
                               0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                           variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree.leaves(changed))


def randomised_norms(variables, key):
    """Variables with BN scale/bias/mean/var drawn at random, so parity covers them too."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    new = []
    for (path, leaf), k in zip(leaves, jax.random.split(key, len(leaves))):
        names = [p.key for p in path]
        if names[-1] in ("scale", "var"):
            leaf = jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 1.5)
        elif names[-1] in ("bias", "mean") and names[-2] != "fc":
            leaf = 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
        new.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.mark.parametrize("model, stage_sizes, width, stem, size", [
    (ResNetTiny(), (1, 1), 8, "cifar", 8),  # stride 2 on an even size: torch pads (1, 1)
    (ResNetTiny(stem="imagenet"), (1, 1), 8, "imagenet", 30),  # odd size after the stem conv
    pytest.param(ResNet18(), (2, 2, 2, 2), 64, "cifar", 32, marks=pytest.mark.slow),  # the full-size net
])
def test_eval_logits_match_torch(torch, model, stage_sizes, width, stem, size):
    from benchmarks.torch_models import TorchResNet, torch_state_dict  # imports torch: after the fixture

    x = np.random.default_rng(0).standard_normal((2, size, size, 3), dtype=np.float32)
    variables = randomised_norms(model.init(jax.random.key(0), x), jax.random.key(1))
    logits = model.apply(variables, x)

    torch_model = TorchResNet(stage_sizes, width, stem)
    torch_model.load_state_dict(torch_state_dict(variables))  # strict: every tensor set, nothing else
    with torch.no_grad():
        torch_logits = torch_model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=1e-4, atol=1e-4)


def test_train_mode_matches_torch(torch, tiny):
    from benchmarks.torch_models import TorchResNet, torch_state_dict  # imports torch: after the fixture

    model, x, variables = tiny
    x = np.array(x)  # writable, as torch.from_numpy wants
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])

    torch_model = TorchResNet((1, 1), 8, "cifar")
    torch_model.load_state_dict(torch_state_dict(variables))
    torch_logits = torch_model.train()(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(logits, torch_logits.detach().numpy(), rtol=1e-4, atol=1e-4)
    # Running means agree; running variances differ by flax's biased vs torch's unbiased estimate.
    np.testing.assert_allclose(state["batch_stats"]["layer2_0"]["bn2"]["mean"],
                               torch_model.layer2[0].bn2.running_mean.numpy(), rtol=1e-4, atol=1e-6)
