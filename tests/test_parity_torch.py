"""Parity with PyTorch: the same initial weights give the same losses, outputs and gradients.

Flax params are copied into torch modules. Layouts: a Dense kernel is (in, out), torch's
weight is (out, in); a conv kernel is HWIO, torch's OIHW; images are NHWC here, NCHW there,
so the CNN's flatten order is HWC here and CHW there.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlearn.models import CNN, RecurrentNet, RegressionNet, SimpleNet
from fnlearn.train import TrainState, cross_entropy, make_optimizer, make_train_step, mse

KEY = jax.random.key(0)
RTOL, ATOL = 1e-4, 1e-5


def tensor(torch, a):
    """A torch tensor holding a copy of `a` (JAX arrays read back as read-only NumPy views)."""
    return torch.from_numpy(np.array(a))


def to_torch_linear(torch, layer, p):
    """Copies a Flax `Linear` param dict {'kernel': (in, out), 'bias'} into a torch nn.Linear."""
    with torch.no_grad():
        layer.weight.copy_(tensor(torch, np.asarray(p["kernel"]).T))
        layer.bias.copy_(tensor(torch, p["bias"]))


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def init(model, x):
    """Flax params from one compiled init (cheaper than an eager op per parameter)."""
    return jax.jit(model.init)(KEY, x)["params"]


def test_seed_regression_adam_loss_trajectory(torch):
    nn = torch.nn
    n_steps = 100
    x = np.linspace(-1, 1, 100, dtype=np.float32)[:, None]
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    y = x**2 + 0.2 * noise
    model = RegressionNet()
    params = init(model, x)

    # Torch first: the JAX step below donates (and so frees) the initial param buffers.
    net = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))
    to_torch_linear(torch, net[0], params["ActivatedLinear_0"]["Linear_0"])
    to_torch_linear(torch, net[2], params["Linear_0"])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch_losses = []
    for _ in range(n_steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(xt), yt)
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())

    state = TrainState.create(apply_fn=model.apply, variables={"params": params},
                              tx=make_optimizer("adam", 0.01))
    step = jax.jit(make_train_step(mse), donate_argnums=0)
    batch = (jnp.asarray(x), jnp.asarray(y))
    jax_losses = []
    for _ in range(n_steps):
        state, metrics = step(state, batch)
        jax_losses.append(metrics["loss"])  # read back once, after the loop

    assert torch_losses[-1] < 0.5 * torch_losses[0]  # it trains, so the trajectories carry signal
    np.testing.assert_allclose(np.asarray(jax.device_get(jax_losses)), torch_losses, rtol=1e-4)


@pytest.fixture(scope="module")
def simple_net_batch():
    """(x (64, 28, 28, 1), labels (64,), SimpleNet params)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 28, 28, 1)).astype(np.float32)
    return x, rng.integers(0, 10, 64), init(SimpleNet(), x)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simple_net_loss_and_grads(torch, simple_net_batch, label_smoothing):
    nn = torch.nn
    x, labels, params = simple_net_batch

    def loss_fn(params):
        return cross_entropy(SimpleNet().apply({"params": params}, x), labels, label_smoothing)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    to_torch_linear(torch, net[1], params["Linear_0"])
    to_torch_linear(torch, net[3], params["Linear_1"])
    torch_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)(
        net(torch.from_numpy(x)), torch.from_numpy(labels))
    torch_loss.backward()

    assert_close(loss, torch_loss.item())
    for name, layer in (("Linear_0", net[1]), ("Linear_1", net[3])):
        assert_close(grads[name]["kernel"], layer.weight.grad.numpy().T)
        assert_close(grads[name]["bias"], layer.bias.grad.numpy())


def test_cnn_forward_and_grads(torch):
    nn = torch.nn
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)  # (B, H, W, C)
    labels = rng.integers(0, 10, 4)
    model = CNN()
    params = init(model, x)

    def loss_fn(params):
        logits = model.apply({"params": params}, x)
        return cross_entropy(logits, labels), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    from benchmarks.torch_models import TorchCNN, cnn_state_dict  # imports torch: after the fixture

    net = TorchCNN()
    net.load_state_dict(cnn_state_dict({"params": params}))  # strict: every tensor is set
    torch_logits = net(torch.from_numpy(x).permute(0, 3, 1, 2))  # NHWC -> NCHW
    torch_loss = nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels))
    torch_loss.backward()

    assert_close(logits, torch_logits.detach().numpy())
    assert_close(loss, torch_loss.item())
    # Compare grads in torch's layout: the same mapping as the weights.
    expected = cnn_state_dict({"params": grads})
    for name, tensor_ in net.named_parameters():
        assert_close(expected[name].numpy(), tensor_.grad.numpy())


def test_recurrent_net_matches_rnn_cell(torch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 10, 5)).astype(np.float32)  # (B, T, features)
    n_steps = 7
    model = RecurrentNet(hidden_size=8)
    params = init(model, x)
    hs = jax.jit(model.apply, static_argnums=2)({"params": params}, x, n_steps)

    cell = torch.nn.RNNCell(5, 8)  # tanh; weight_ih (8, 5) and weight_hh (8, 8): the same layout
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(tensor(torch, params[name]))
        h = torch.zeros(3, 8)
        torch_hs = []
        for t in range(n_steps):
            h = cell(torch.from_numpy(x[:, t]), h)
            torch_hs.append(h)
    assert_close(hs, torch.stack(torch_hs, 1).numpy())
