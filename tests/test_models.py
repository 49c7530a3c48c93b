"""The basic models: output shapes, parameter counts, dynamic control flow, shared inits, the registry."""
import ast
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlearn.models
from fnlearn.models import (CNN, ActivatedLinear, CustomLinear, DynamicNet, Linear, LinearRegression, Net,
                            RecurrentNet, RegressionNet, SimpleNet, VariableDepthMLP, layers)
from fnlearn.models.basics import ACTIVATIONS

KEY = jax.random.key(0)
RNG = np.random.default_rng(0)  # NumPy inputs: no PRNG program to compile per shape


def n_params(variables):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


def init(model, *args):
    """`model.init` as one compiled program: faster here than an eager op per parameter."""
    return jax.jit(model.init)(KEY, *args)


@pytest.mark.parametrize("model, x_shape, out_shape, count", [
    (LinearRegression(), (5, 1), (5, 1), 2),                        # 1*1 + 1
    (RegressionNet(), (5, 1), (5, 1), 61),                          # 1*20+20 + 20*1+1
    (Net(), (5, 28, 28, 1), (5, 10), 7_850),                        # 784*10 + 10
    (SimpleNet(), (5, 28, 28, 1), (5, 10), 101_770),                # 784*128+128 + 128*10+10
    (CNN(), (5, 16, 16, 3), (5, 10), 31_818),                       # 3*3*3*16+16 + 16*14*14*10+10
    (DynamicNet(), (5, 10), (5, 5), 745),                           # 10*20+20 + 20*20+20 + 20*5+5
    (RecurrentNet(hidden_size=8), (3, 10, 5), (3, 10, 8), 120),     # 8*5 + 8*8 + 8 + 8
    (CustomLinear(3, 2), (5, 3), (5, 2), 8),                        # 2*3 + 2
    (ActivatedLinear(3, 4), (5, 3), (5, 4), 16),                    # 3*4 + 4
])
def test_shapes_and_parameter_counts(model, x_shape, out_shape, count):
    # Shapes only: eval_shape traces init and apply without running them.
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(model.init, KEY, x)
    assert jax.eval_shape(model.apply, variables, x).shape == out_shape
    assert n_params(variables) == count


def test_variable_depth_mlp_shape_and_count():
    model = VariableDepthMLP(hidden=32, out_features=1, max_depth=8)
    x = jax.ShapeDtypeStruct((5, 4), jnp.float32)
    variables = jax.eval_shape(model.init, KEY, x, 3)
    assert jax.eval_shape(model.apply, variables, x, 3).shape == (5, 1)
    # input 4*32+32 = 160; stacked hidden 8*(32*32+32) = 8,448; output 32*1+1 = 33
    assert n_params(variables) == 8_641


def test_torch_default_init_bounds():
    params = init(Linear(16), jnp.ones((1, 784)))["params"]
    kernel, bias = params["kernel"], params["bias"]
    bound = 1 / np.sqrt(784)  # nn.Linear: U(±1/sqrt(in_features)) for weight and bias
    assert float(jnp.abs(kernel).max()) <= bound
    assert float(jnp.abs(bias).max()) <= bound
    assert float(jnp.abs(kernel).max()) > 0.9 * bound  # the full range is used, not a narrower init


@pytest.mark.parametrize("init, shape", [
    (layers.torch_uniform_init(576), (576, 256)),  # fan-in given
    (layers.torch_kernel_init, (576, 256)),        # dense kernel (in, out): fan-in 576
    (layers.torch_kernel_init, (3, 3, 64, 256)),   # conv kernel: fan-in 3*3*64 = 576
])
def test_shared_torch_inits_are_uniform_over_one_over_sqrt_fan_in(init, shape):
    w = np.asarray(jax.jit(init, static_argnums=1)(KEY, shape))
    bound = 1 / np.sqrt(576)  # PyTorch's U(±1/sqrt(fan_in))
    assert w.dtype == np.float32 and w.shape == shape
    # 147,456 draws: the extremes reach the bound, and U(-b, b) has std b/sqrt(3).
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.999 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.01)
    assert abs(w.mean()) < 0.01 * bound


def test_linear_promotes_its_input_as_flax_dense_does():
    layer = Linear(3)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    want = layer.apply(variables, jnp.ones((1, 4)))
    got = layer.apply(variables, jnp.ones((1, 4), jnp.int32))  # not a kernel truncated to zeros
    assert got.dtype == jnp.float32 and np.array_equal(got, want)
    assert layer.apply(variables, jnp.ones((1, 4), jnp.bfloat16)).dtype == jnp.float32
    assert Linear(3, dtype=jnp.bfloat16).apply(variables, jnp.ones((1, 4))).dtype == jnp.bfloat16


def test_custom_linear_is_x_w_transpose_plus_b():
    model = CustomLinear(3, 2)
    x = RNG.standard_normal((4, 3), dtype=np.float32)
    variables = init(model, x)
    w, b = variables["params"]["weight"], variables["params"]["bias"]
    assert w.shape == (2, 3)  # (out, in), F.linear's layout
    np.testing.assert_allclose(model.apply(variables, x), x @ np.asarray(w).T + np.asarray(b), rtol=1e-6)


@pytest.fixture(scope="module")
def activated_linear_params():
    """One set of params for every activation: the name does not change the parameter tree."""
    return init(ActivatedLinear(3, 6), np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("name, reference", [
    ("relu", lambda y: np.maximum(y, 0)),
    ("sigmoid", lambda y: 1 / (1 + np.exp(-y))),
    ("tanh", np.tanh),
    ("leaky_relu", lambda y: np.where(y > 0, y, 0.1 * y)),
])
def test_activated_linear(activated_linear_params, name, reference):
    x = RNG.standard_normal((8, 3), dtype=np.float32)
    p = activated_linear_params["params"]["Linear_0"]
    pre = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    assert (pre < 0).any() and (pre > 0).any()  # both sides of zero are exercised
    out = ActivatedLinear(3, 6, name).apply(activated_linear_params, x)
    np.testing.assert_allclose(out, reference(pre), rtol=1e-5, atol=1e-6)


def test_activated_linear_unknown_activation_raises_listing_known_ones():
    # Raised when the module is built, before any init or apply.
    with pytest.raises(ValueError, match="'relu_'") as info:
        ActivatedLinear(3, 6, "relu_")
    for name in ACTIVATIONS:
        assert name in str(info.value)


@pytest.fixture(scope="module")
def dynamic_net():
    """(model, x, variables) shared by the DynamicNet tests."""
    model = DynamicNet()
    x = RNG.standard_normal((4, 10), dtype=np.float32)
    return model, x, init(model, x)


def test_dynamic_net_paths_differ_and_shortcut_skips_middle(dynamic_net):
    model, x, variables = dynamic_net
    p = jax.tree.map(np.asarray, variables["params"])
    h = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    deep = np.maximum(h @ p["middle"]["kernel"] + p["middle"]["bias"], 0)
    out = lambda v: v @ p["out"]["kernel"] + p["out"]["bias"]  # noqa: E731
    np.testing.assert_allclose(model.apply(variables, x, True), out(h), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, x, False), out(deep), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out(h), out(deep))


def test_dynamic_net_init_creates_middle_whichever_path():
    x = jnp.ones((2, 10))
    for flag in (True, False, jnp.array(True)):
        variables = jax.eval_shape(lambda key, v: DynamicNet().init(key, v, flag), KEY, x)  # noqa: B023
        assert set(variables["params"]) == {"hidden", "middle", "out"}


def test_dynamic_net_traced_bool_compiles_once_and_matches_python_path(dynamic_net):
    model, x, variables = dynamic_net
    traces = []

    @jax.jit
    def forward(variables, x, flag):
        traces.append(1)  # Python side effect: runs once per trace, not per call
        return model.apply(variables, x, flag)

    for flag in (True, False, True):
        np.testing.assert_allclose(forward(variables, x, jnp.array(flag)), model.apply(variables, x, flag),
                                   rtol=1e-6, atol=1e-6)
    assert len(traces) == 1
    assert forward._cache_size() == 1


def test_dynamic_net_python_bool_traces_per_value(dynamic_net):
    model, x, variables = dynamic_net
    forward = jax.jit(model.apply, static_argnums=2)
    for flag in (True, False, True):
        forward(variables, x, flag)
    assert forward._cache_size() == 2  # a program per Python value, reused on the repeat


@pytest.fixture(scope="module")
def mlp():
    """(model, x, variables) shared by the VariableDepthMLP tests."""
    model = VariableDepthMLP(hidden=16, out_features=3, max_depth=4)
    x = RNG.standard_normal((5, 6), dtype=np.float32)
    return model, x, init(model, x, 1)


def test_variable_depth_one_program_many_depths_and_fixed_params(mlp):
    model, x, variables = mlp
    snapshot = jax.tree.map(np.array, variables)
    forward = jax.jit(model.apply)
    outs = [np.asarray(forward(variables, x, jnp.int32(d))) for d in (1, 2, 3, 4)]
    assert forward._cache_size() == 1
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not np.allclose(outs[i], outs[j])
    # Same depth again gives the same output: no fresh random layers per call (the tutorial's bug).
    np.testing.assert_array_equal(forward(variables, x, jnp.int32(2)), outs[1])
    jax.tree.map(np.testing.assert_array_equal, variables, snapshot)
    # Depth is not part of the parameter tree: init at any depth makes the same stacked params.
    shapes = jax.tree.map(lambda a: a.shape, variables)
    assert jax.tree.map(lambda a: a.shape, jax.eval_shape(model.init, KEY, x, 4)) == shapes
    assert shapes["params"]["hidden_kernels"] == (4, 16, 16)


def test_variable_depth_matches_manual_stack(mlp):
    model, x, variables = mlp
    p = jax.tree.map(np.asarray, variables["params"])
    h = np.maximum(x @ p["input"]["kernel"] + p["input"]["bias"], 0)
    for i in range(2):
        h = np.maximum(h @ p["hidden_kernels"][i] + p["hidden_biases"][i], 0)
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x, 2), expected, rtol=1e-5, atol=1e-6)
    # Depths beyond max_depth are clipped to it.
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x, 9), jax.jit(model.apply)(variables, x, 4),
                               rtol=1e-6)


def test_recurrent_net_n_steps():
    model = RecurrentNet(hidden_size=8)
    x = RNG.standard_normal((3, 10, 5), dtype=np.float32)
    variables = init(model, x)
    apply = jax.jit(model.apply, static_argnums=2)  # n_steps sets the output shape
    full = apply(variables, x, 10)
    part = apply(variables, x, 7)
    assert part.shape == (3, 7, 8)
    # A prefix of the sequence gives the prefix of the hidden states.
    np.testing.assert_allclose(part, full[:, :7], rtol=1e-6)
    with pytest.raises(ValueError, match="n_steps=11"):
        model.apply(variables, x, 11)
    with pytest.raises(ValueError):
        model.apply(variables, x, 0)


def test_registry_get_by_name():
    model = fnlearn.models.get("simple_net")
    assert isinstance(model, SimpleNet)
    assert fnlearn.models.get("simple_net", dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert isinstance(fnlearn.models.get("variable_depth_mlp", max_depth=2), VariableDepthMLP)
    assert {"simple_net", "cnn", "dynamic_net", "recurrent_net"} <= set(fnlearn.models.names())


def test_registry_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as info:
        fnlearn.models.get("no_such_model")
    message = str(info.value)
    assert "no_such_model" in message
    for name in fnlearn.models.names():
        assert name in message


def test_registry_data_init_is_declared_per_family():
    # What applying FastNet's does is checked in test_fastnet.py.
    assert fnlearn.models.data_init("fastnet") is fnlearn.models.with_whitening
    for name in ("resnet18", "resnet_tiny", "simple_net"):
        assert fnlearn.models.data_init(name) is None, name
    assert {n for n in fnlearn.models.names() if fnlearn.models.data_init(n)} == {
        "fastnet", "fastnet_muon", "fastnet_small", "fastnet_tiny"}
    with pytest.raises(KeyError, match="no_such_model"):
        fnlearn.models.data_init("no_such_model")


def test_model_families_import_only_shared_layers():
    # Shared pieces live in models/layers.py; a family module never imports a sibling family.
    models_dir = pathlib.Path(fnlearn.models.__file__).parent
    families = {"basics", "resnet", "fastnet", "yolo"}
    for family in families:
        tree = ast.parse((models_dir / f"{family}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):  # relative ones resolved: "from .resnet import X"
                module = importlib.util.resolve_name("." * node.level + (node.module or ""), "fnlearn.models")
                imported.add(module)
                imported.update(f"{module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        siblings = {f"fnlearn.models.{f}" for f in families - {family}}
        assert not imported & siblings, (family, imported & siblings)
