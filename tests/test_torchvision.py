"""torchvision ResNet weights in and out: logit parity both ways, bit-exact round trips, refusals.

`TorchResNet` stands in for torchvision (not importable with the CPU torch here), with its
exact parameter names. Logits are O(1) (BatchNorm statistics of real activations, or
variance-preserving random kernels), so the tolerances are three or four orders below them.
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from fnlearn import models
from fnlearn.models import WeightsError, from_torchvision, to_torchvision

RESNET34 = (3, 4, 6, 3)


def nchw(torch, x):
    """(B, H, W, C) numpy -> (B, C, H, W) tensor."""
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def torchvision_like(torch, stage_sizes=(2, 2, 2, 2), bottleneck=False):
    """torchvision's ResNet (ImageNet stem, 1000 classes) in eval mode, with random BatchNorm
    weights and biases and running statistics set from one random batch (distinct per channel)."""
    from benchmarks.torch_models import TorchBasicBlock, TorchBottleneck, TorchResNet  # imports torch

    net = TorchResNet(stage_sizes, 64, "imagenet", 1000, TorchBottleneck if bottleneck else TorchBasicBlock)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.momentum = 1.0  # the running statistics become the batch's
        net.train()(torch.randn(2, 3, 64, 64))
    return net.eval()


@pytest.fixture(scope="module")
def resnet18():
    """fnlearn's resnet18_imagenet with random variables: kernels N(0, 1/fan_in), BatchNorm scale
    and var U(0.5, 1.5), biases and means N(0, 0.1). Drawn from the shapes: `init` takes seconds."""
    model = models.get("resnet18_imagenet", num_classes=1000)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            return jnp.asarray(rng.normal(0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape), jnp.float32)
        if path[-1].key in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def images(batch=2, size=64, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


def test_torchvision_to_fnlearn_logits_match(torch, tmp_path):
    import safetensors.torch  # imports torch: after the fixture

    net = torchvision_like(torch)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    safetensors.torch.save_file(net.state_dict(), tmp_path / "resnet18.safetensors")
    x = images()
    with torch.no_grad():
        expected = net(nchw(torch, x)).numpy()

    model, variables = from_torchvision("resnet18", tmp_path / "resnet18.pth")
    logits = model.apply(variables, x)
    assert logits.shape == (2, 1000) and np.std(expected) > 0.1
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    # The safetensors file gives the very same variables.
    _, from_safetensors = from_torchvision("resnet18", tmp_path / "resnet18.safetensors")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, from_safetensors))


def test_resnet50_to_fnlearn_logits_match(torch, tmp_path):
    net = torchvision_like(torch, RESNET34, bottleneck=True)
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    x = images(batch=1)
    with torch.no_grad():
        expected = net(nchw(torch, x)).numpy()

    model, variables = from_torchvision("resnet50", tmp_path / "resnet50.pth")
    assert np.std(expected) > 0.1
    # 1e-3, not 1e-4: through 50 float32 layers torch's own logits are 2.4e-4 from its float64
    # ones here, and fnlearn's as far; a misplaced weight is off by O(1).
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=0, atol=1e-3)


def test_fnlearn_to_torchvision_loads_strictly_and_logits_match(torch, resnet18, tmp_path):
    from benchmarks.torch_models import TorchResNet  # imports torch: after the fixture

    model, variables = resnet18
    state = to_torchvision(variables, tmp_path / "resnet18.pth")
    assert os.listdir(tmp_path) == ["resnet18.pth"]  # no temporary file left behind
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)  # OIHW
    assert state["layer2.0.downsample.1.num_batches_tracked"].dtype == np.int64

    net = TorchResNet((2, 2, 2, 2), 64, "imagenet", 1000)
    net.load_state_dict(torch.load(tmp_path / "resnet18.pth", weights_only=True))  # strict
    x = images()
    logits = model.apply(variables, x)
    with torch.no_grad():
        torch_logits = net.eval()(nchw(torch, x)).numpy()
    assert np.std(logits) > 0.1
    np.testing.assert_allclose(logits, torch_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_is_bit_exact(resnet18, tmp_path, request, suffix):
    if suffix == ".pth":
        request.getfixturevalue("torch")  # skipped without torch
    model, variables = resnet18
    path = tmp_path / f"resnet18{suffix}"
    to_torchvision(variables, path)
    loaded_model, loaded = from_torchvision("resnet18", path)
    assert loaded_model == model
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, variables))
    # A bfloat16 policy stores the parameters in bfloat16 and keeps the statistics in float32.
    _, half = from_torchvision("resnet18", path, param_dtype=jnp.bfloat16)
    assert half["params"]["fc"]["kernel"].dtype == jnp.bfloat16
    assert half["batch_stats"]["bn1"]["var"].dtype == jnp.float32


def test_reads_bfloat16_safetensors(resnet18, tmp_path):
    _, variables = resnet18
    state = {k: jnp.asarray(a, jnp.bfloat16 if a.dtype == np.float32 else None)
             for k, a in to_torchvision(variables).items()}
    safetensors.flax.save_file(state, tmp_path / "resnet18.safetensors")
    _, loaded = from_torchvision("resnet18", tmp_path / "resnet18.safetensors")
    assert loaded["params"]["fc"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], state["fc.weight"].astype(jnp.float32).T)


def test_reads_bfloat16_torch_files(torch, resnet18, tmp_path):
    _, variables = resnet18
    state = {k: torch.from_numpy(a).bfloat16() if a.dtype == np.float32 else torch.from_numpy(a)
             for k, a in to_torchvision(variables).items()}
    torch.save(state, tmp_path / "resnet18.pth")
    _, loaded = from_torchvision("resnet18", tmp_path / "resnet18.pth")
    np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"],
                                  state["conv1.weight"].float().permute(2, 3, 1, 0).numpy())


def test_reads_a_file_of_parameters_that_need_grad(torch, resnet18, tmp_path):
    # `dict(model.named_parameters())` and `state_dict(keep_vars=True)` save nn.Parameters.
    _, variables = resnet18
    state = {k: torch.nn.Parameter(torch.from_numpy(a)) if a.dtype == np.float32 else torch.from_numpy(a)
             for k, a in to_torchvision(variables).items()}
    torch.save(state, tmp_path / "resnet18.pth")
    _, loaded = from_torchvision("resnet18", tmp_path / "resnet18.pth")
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], state["fc.weight"].detach().numpy().T)


def test_failed_write_leaves_nothing(resnet18, tmp_path, monkeypatch):
    def save_half(state, filename):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", save_half)
    with pytest.raises(OSError, match="disk full"):
        to_torchvision(resnet18[1], tmp_path / "resnet18.safetensors")
    assert os.listdir(tmp_path) == []


def refusal(path):
    """The message of the WeightsError that loading `path` as resnet18 raises."""
    with pytest.raises(WeightsError) as error:
        from_torchvision("resnet18", path)
    return str(error.value)


def test_refuses_unknown_names():
    with pytest.raises(ValueError, match="'resnet101'; choose one of resnet18, resnet34, resnet50"):
        from_torchvision("resnet101", "resnet101.pth")


def test_refuses_files_that_are_not_state_dicts(torch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short paths in the messages
    os.mkdir("folder.pth")
    for name in ("notes.pth", "notes.safetensors"):
        open(name, "w").write("hello\n")
    torch.save([torch.zeros(2)], "list.pth")
    torch.save({"conv1.weight": [1.0]}, "lists.pth")
    torch.save({"args": argparse.Namespace(lr=0.1)}, "pickled.pth")  # weights_only refuses it
    assert refusal("missing.pth") == "no file at missing.pth"
    assert refusal("folder.pth") == "no file at folder.pth"
    assert refusal("notes.pth").startswith("notes.pth is not a state_dict torch.load(weights_only=True) reads")
    assert refusal("notes.safetensors").startswith("notes.safetensors is not a safetensors file (")
    assert refusal("list.pth") == "list.pth holds a list, not a state dict of names to tensors"
    assert refusal("lists.pth") == "lists.pth is not a state dict of names to tensors: 'conv1.weight' is a list"
    assert refusal("pickled.pth").endswith(
        "reads (Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default)")


def test_refuses_another_architecture(torch, tmp_path, monkeypatch):
    from benchmarks.torch_models import TorchResNet  # imports torch: after the fixture

    monkeypatch.chdir(tmp_path)
    torch.save(TorchResNet(RESNET34, 64, "imagenet", 1000).state_dict(), "resnet34.pth")
    # torchvision's order: the stem, layer1.0, layer1.1, then the block resnet18 lacks.
    assert refusal("resnet34.pth") == (
        "resnet34.pth: layer1.2.conv1.weight has no place in resnet18 (weights of another architecture?)")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"layer3.1.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)}),
     ": layer3.1.conv2.weight: file (256, 256, 1, 1), resnet18 expects (256, 256, 3, 3)"),
    (lambda s: s.update({"fc.weight": np.zeros((10, 256), np.float32), "fc.bias": np.zeros(10, np.float32)}),
     ": fc.weight: file (10, 256), resnet18 expects (10, 512)"),
    (lambda s: s.pop("layer4.1.bn2.running_var"), " lacks layer4.1.bn2.running_var, which resnet18 needs"),
    (lambda s: s.pop("fc.weight"), " has no fc.weight; resnet18 needs a (num_classes, features) fc.weight"),
])
def test_refuses_keys_that_do_not_fit(resnet18, tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    state = to_torchvision(resnet18[1])
    change(state)
    safetensors.numpy.save_file(state, "resnet18.safetensors")
    assert refusal("resnet18.safetensors") == f"resnet18.safetensors{message}"
