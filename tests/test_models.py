"""The basic models: output shapes, parameter counts, dynamic control flow, the registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnlearn.models
from fnlearn.models import (CNN, ActivatedLinear, CustomLinear, DynamicNet, LinearRegression, Net,
                            RecurrentNet, RegressionNet, SimpleNet, VariableDepthMLP)

KEY = jax.random.key(0)


def n_params(variables):
    return sum(p.size for p in jax.tree.leaves(variables["params"]))


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
    x = jnp.ones(x_shape)
    variables = model.init(KEY, x)
    assert model.apply(variables, x).shape == out_shape
    assert n_params(variables) == count


def test_variable_depth_mlp_shape_and_count():
    model = VariableDepthMLP(hidden=32, out_features=1, max_depth=8)
    x = jnp.ones((5, 4))
    variables = model.init(KEY, x, 3)
    assert model.apply(variables, x, 3).shape == (5, 1)
    # input 4*32+32 = 160; stacked hidden 8*(32*32+32) = 8,448; output 32*1+1 = 33
    assert n_params(variables) == 8_641


def test_torch_default_init_bounds():
    params = SimpleNet().init(KEY, jnp.ones((1, 784)))["params"]
    kernel, bias = params["Linear_0"]["kernel"], params["Linear_0"]["bias"]
    bound = 1 / np.sqrt(784)  # nn.Linear: U(±1/sqrt(in_features)) for weight and bias
    assert float(jnp.abs(kernel).max()) <= bound
    assert float(jnp.abs(bias).max()) <= bound
    assert float(jnp.abs(kernel).max()) > 0.9 * bound  # the full range is used, not a narrower init


def test_custom_linear_is_x_w_transpose_plus_b():
    model = CustomLinear(3, 2)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    variables = model.init(KEY, x)
    w, b = variables["params"]["weight"], variables["params"]["bias"]
    assert w.shape == (2, 3)  # (out, in), F.linear's layout
    np.testing.assert_allclose(model.apply(variables, x), np.asarray(x) @ np.asarray(w).T + np.asarray(b),
                               rtol=1e-6)


@pytest.mark.parametrize("name, reference", [
    ("relu", lambda y: np.maximum(y, 0)),
    ("sigmoid", lambda y: 1 / (1 + np.exp(-y))),
    ("tanh", np.tanh),
    ("leaky_relu", lambda y: np.where(y > 0, y, 0.1 * y)),
    ("no_such_activation", lambda y: y),
])
def test_activated_linear(name, reference):
    model = ActivatedLinear(3, 6, name)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    variables = model.init(KEY, x)
    p = variables["params"]["Linear_0"]
    pre = np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    assert (pre < 0).any() and (pre > 0).any()  # both sides of zero are exercised
    np.testing.assert_allclose(model.apply(variables, x), reference(pre), rtol=1e-5, atol=1e-6)


def test_dynamic_net_paths_differ_and_shortcut_skips_middle():
    model = DynamicNet()
    x = jax.random.normal(jax.random.key(1), (4, 10))
    variables = model.init(KEY, x)
    p = jax.tree.map(np.asarray, variables["params"])
    h = np.maximum(np.asarray(x) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    deep = np.maximum(h @ p["middle"]["kernel"] + p["middle"]["bias"], 0)
    out = lambda v: v @ p["out"]["kernel"] + p["out"]["bias"]  # noqa: E731
    np.testing.assert_allclose(model.apply(variables, x, True), out(h), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, x, False), out(deep), rtol=1e-5, atol=1e-6)


def test_dynamic_net_init_creates_middle_whichever_path():
    x = jnp.ones((2, 10))
    for flag in (True, False, jnp.array(True)):
        assert set(DynamicNet().init(KEY, x, flag)["params"]) == {"hidden", "middle", "out"}


def test_dynamic_net_traced_bool_compiles_once_and_matches_python_path():
    model = DynamicNet()
    x = jax.random.normal(jax.random.key(1), (4, 10))
    variables = model.init(KEY, x)
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


def test_dynamic_net_python_bool_traces_per_value():
    model = DynamicNet()
    x = jnp.ones((2, 10))
    variables = model.init(KEY, x)
    forward = jax.jit(model.apply, static_argnums=2)
    for flag in (True, False, True):
        forward(variables, x, flag)
    assert forward._cache_size() == 2  # a program per Python value, reused on the repeat


def test_variable_depth_one_program_many_depths_and_fixed_params():
    model = VariableDepthMLP(hidden=16, out_features=3, max_depth=4)
    x = jax.random.normal(jax.random.key(1), (5, 6))
    variables = model.init(KEY, x, 1)
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
    # Init at another depth creates the same params: depth is not part of the parameter structure.
    jax.tree.map(np.testing.assert_array_equal, model.init(KEY, x, 4), snapshot)


def test_variable_depth_matches_manual_stack():
    model = VariableDepthMLP(hidden=8, out_features=2, max_depth=3)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    variables = model.init(KEY, x, 1)
    p = jax.tree.map(np.asarray, variables["params"])
    h = np.maximum(np.asarray(x) @ p["input"]["kernel"] + p["input"]["bias"], 0)
    for i in range(2):
        h = np.maximum(h @ p["hidden_kernels"][i] + p["hidden_biases"][i], 0)
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(model.apply(variables, x, 2), expected, rtol=1e-5, atol=1e-6)


def test_recurrent_net_n_steps():
    model = RecurrentNet(hidden_size=8)
    x = jax.random.normal(jax.random.key(1), (3, 10, 5))
    variables = model.init(KEY, x)
    full = model.apply(variables, x)
    part = model.apply(variables, x, 7)
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

