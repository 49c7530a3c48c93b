"""Developer tools: the model summary's parameter counts and FLOPs, checked by hand."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlearn import models
from fnlearn import summary as summary_command
from fnlearn.models import layers
from fnlearn.pytrees import path_name as path_name
from fnlearn.tools import find_anomaly, grad_stats, graph, hook_gradients, summary


class TinyConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(layers.Conv(4, (3, 3), padding="VALID", name="conv")(x))  # (1, 6, 6, 2) -> (1, 4, 4, 4)
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))  # 64 -> 3


def test_forward_flops_of_a_small_conv_net_by_hand():
    s = summary(TinyConvNet(), jnp.zeros((1, 6, 6, 2)))
    conv = 2 * (4 * 4 * 4) * (3 * 3 * 2) + 4 * 4 * 4  # 2 FLOPs per multiply-add over 64 outputs of 18 taps, + bias
    relu = 4 * 4 * 4
    fc = 2 * 64 * 3 + 3
    assert s.flops == conv + relu + fc == 2819
    rows = {line.split("│")[1].strip(): line for line in s.table.splitlines() if line.count("│") > 5}
    assert f" {conv} " in rows["conv"] and f" {fc} " in rows["fc"]  # the per-layer column, the same counts
    # The backward adds at least the weight gradients' work (the forward's again) to the forward it reruns.
    assert 2 * s.flops <= s.flops_with_backward <= 4 * s.flops
    assert s.params == (3 * 3 * 2 * 4 + 4) + (64 * 3 + 3) and s.param_bytes == 4 * s.params


def test_resnet18_parameter_count_equals_its_params_tree():
    model = models.get("resnet18")
    s = summary(model, jnp.zeros((1, 32, 32, 3)), depth=1)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert s.params == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree["params"]))
    # torchvision's resnet18 has 11,689,512 with 1000 classes; 10 classes drop 512 * 990 + 990, and the
    # CIFAR stem's 3x3 conv1 has 64 * 3 * (49 - 9) fewer weights than the 7x7.
    assert s.params == 11_689_512 - 512 * 990 - 990 - 64 * 3 * 40 == 11_173_962
    assert s.other == 2 * 4800  # BatchNorm mean and var of 64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512 channels
    assert "layer4_1" in s.table and "11,173,962" in str(s)


def test_the_command_prints_the_table_and_refuses_unknown_models(capsys):
    summary_command.main(["simple_net", "--input-shape", "784"])
    out = capsys.readouterr().out
    assert "parameters: 101,770" in out and "forward + backward" in out  # 784*128+128 + 128*10+10
    with pytest.raises(SystemExit, match="unknown model 'resnet19'"):
        summary_command.main(["resnet19"])
    with pytest.raises(SystemExit, match="cannot summarise resnet18 on inputs of shape"):
        summary_command.main(["resnet18", "--input-shape", "784"])
    with pytest.raises(SystemExit, match="cannot summarise cnn on inputs of shape .*ZeroDivisionError"):
        summary_command.main(["cnn", "--input-shape", "32,32"])  # a modulo by zero in the model


def test_the_jaxpr_graph_names_the_ops_and_boxes_them_by_module():
    model = models.get("resnet_tiny")
    x = jnp.zeros((1, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    dot = graph.jaxpr_dot(lambda v, x: model.apply(v, x), variables, x)
    assert dot.startswith("digraph") and dot.count("{") == dot.count("}")
    for module in ("conv1", "bn1", "layer1_0", "layer2_0", "downsample_conv", "fc"):
        assert f'label="{module}"' in dot
    assert dot.count('label="bn1"') == 3  # one box each: the stem's and layer1_0's and layer1_1's
    for op in ("cond", "rsqrt", "dot_general", "reduce_sum", "float32[1,10]"):
        assert op in dot
    assert "->" in dot


def test_the_hlo_graph_shows_what_xla_runs_loops_and_tuples_included():
    def f(x, w):
        y = jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ w), x)
        return y.sum(), y  # a tuple out of a loop's tuple
    dot = graph.hlo_dot(f, jnp.ones((4, 8)), jnp.ones((8, 8)))
    assert dot.startswith("digraph hlo") and "parameter" in dot and "f32[4,8]" in dot and "f32[8,8]" in dot
    nodes = dict(re.findall(r'^  "([^"]+)" \[label="([^"\\]+)', dot, re.M))
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";', dot, re.M)
    assert {"tuple", "get-tuple-element"} <= {label for label in nodes.values()}
    assert all(a in nodes and b in nodes for a, b in edges)  # every arrow joins two drawn instructions
    outputs = [name for name, label in nodes.items() if label == "tuple"]
    assert any(b == outputs[-1] for _, b in edges)  # the result tuple is fed


def test_rendering_without_graphviz_names_the_missing_program(tmp_path, monkeypatch):
    dot = graph.jaxpr_dot(jnp.sin, jnp.ones(3))
    assert graph.render(dot, tmp_path / "g.dot").read_text() == dot
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    with pytest.raises(graph.GraphError, match="needs Graphviz's `dot` program"):
        graph.render(dot, tmp_path / "g.svg")
    assert not (tmp_path / "g.svg").exists()


def _resnet_tiny_loss():
    model = models.get("resnet_tiny")
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    y = jnp.arange(4) % 10
    variables = model.init(jax.random.key(1), x)

    def loss(params, apply_fn=model.apply):
        logits = apply_fn({**variables, "params": params}, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

    return model, variables, loss


def test_gradient_statistics_inside_jit_equal_those_computed_directly():
    _, variables, loss = _resnet_tiny_loss()
    grads, stats = jax.jit(lambda p: (g := jax.grad(loss)(p), grad_stats(g)))(variables["params"])
    g = np.asarray(grads["layer2_0"]["conv1"]["kernel"], np.float64)
    got = stats["layer2_0/conv1/kernel"]
    np.testing.assert_allclose(float(got["norm"]), np.sqrt((g ** 2).sum()), rtol=1e-5)
    np.testing.assert_allclose(float(got["mean"]), g.mean(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(float(got["max_abs"]), np.abs(g).max(), rtol=1e-6)
    assert len(stats) == len(jax.tree.leaves(variables["params"]))


def test_the_gradient_hook_fires_under_jit_with_the_outputs_shapes_and_values():
    model, variables, loss = _resnet_tiny_loss()
    seen = []
    hooked = hook_gradients(model.apply, ["layer1_0/conv1", "fc", "bn1"],
                            lambda path, g: seen.append((path, np.array(g))))
    grads = jax.jit(jax.grad(lambda p: loss(p, hooked)))(variables["params"])
    jax.block_until_ready(grads)
    seen = sorted(seen, key=lambda item: (item[0] != "fc", item[0]))  # callbacks under jit come in no set order
    # Once each, the zoo's BatchNorm (a subclass of flax's) included.
    assert [(path, g.shape) for path, g in seen] == [("fc", (4, 10)), ("bn1", (4, 16, 16, 8)),
                                                     ("layer1_0/conv1", (4, 16, 16, 8))]
    # fc's output gradient is d(mean cross-entropy)/d(logits) = (softmax - onehot) / batch, by hand.
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    logits = model.apply(variables, x)
    expected = (jax.nn.softmax(logits) - jax.nn.one_hot(jnp.arange(4) % 10, 10)) / 4
    np.testing.assert_allclose(seen[0][1], expected, rtol=1e-5, atol=1e-7)
    plain = jax.jit(jax.grad(loss))(variables["params"])
    for hooked_leaf, plain_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(hooked_leaf, plain_leaf, rtol=1e-5, atol=1e-7)  # the hook changes nothing


@pytest.mark.parametrize("inject, where, name", [
    ("none", None, None),
    ("parameter", "parameter", "layer2_0/bn1/scale"),
    ("input", "forward", "conv1"),
    ("backward", "backward", "fc"),
    ("input on 8 devices", "forward", "conv1"),
])
def test_the_first_nan_is_named_forward_or_backward(inject, where, name):
    model, variables, _ = _resnet_tiny_loss()
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    if inject == "parameter":
        scale = variables["params"]["layer2_0"]["bn1"]["scale"]
        variables = jax.tree_util.tree_map_with_path(
            lambda p, a: scale.at[3].set(jnp.inf) if path_name(p) == "params/layer2_0/bn1/scale" else a, variables)
    if inject.startswith("input"):
        x = x.at[0, 0, 0, 0].set(jnp.nan)
    if inject == "input on 8 devices":  # the recipe's layout: state replicated, the batch split
        mesh = jax.sharding.Mesh(jax.devices(), ("data",))
        variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    def loss(params, x):
        logits = model.apply({**variables, "params": params}, x)
        if inject == "backward":  # finite forward; sqrt's slope at 0 is inf, so fc's output gradient is not
            return jnp.mean(jnp.sqrt(jnp.maximum(logits, 0)))
        return jnp.mean(logits ** 2)

    anomaly = find_anomaly(loss, variables, x)
    if where is None:
        assert anomaly is None
    else:
        assert (anomaly.where, anomaly.name) == (where, name) and anomaly.count > 0
        assert name in str(anomaly)


def test_an_async_op_runs_until_its_end_unless_it_is_a_split_kernel():
    from fnlearn.tools.profile import event_intervals, split_kernels
    hlo = ("  %conv.1 = f32[8,4,4,16]{3,2,1,0} convolution(%x, %k), window={size=3x3}\n"
           "  %pad_fusion.2 = f32[8,7,7,16]{3,2,1,0} fusion(%a), kind=kLoop, calls=%f, "
           'backend_config={"outer_dimension_partitions":["2"]}\n'
           "  %add_fusion = f32[8]{0} fusion(%b), kind=kLoop, calls=%g\n")
    split = split_kernels(hlo)
    assert split == {"pad_fusion.2"}
    ms = 1_000_000
    events = [("conv.1", 0, ms // 10), ("pad_fusion.2", 2 * ms, 5 * ms), ("add_fusion", 5 * ms, 6 * ms),
              ("end: conv.1", 9 * ms, 9 * ms), ("end: pad_fusion.2", 500 * ms, 500 * ms)]
    # The convolution's start event is its dispatch; the split kernel's is its run, however late its end.
    assert event_intervals(events, split) == {"conv.1": [(0, ms // 10), (0, 9 * ms)],
                                              "pad_fusion.2": [(2 * ms, 5 * ms)], "add_fusion": [(5 * ms, 6 * ms)]}
    assert event_intervals(events)["pad_fusion.2"] == [(2 * ms, 5 * ms), (2 * ms, 500 * ms)]


def test_an_ops_metadata_reads_as_its_layer():
    from fnlearn.tools.profile import readable, union_ms
    assert readable("jit(train)/while/body/closed_call/transpose(jvp(FastNet))/block2/conv1/cond/branch_0_fun/"
                    "conv_general_dilated") == "backward block2/conv1/conv_general_dilated"
    assert readable("jit(train)/while/body/closed_call/jvp(FastNet)/block1/bn1/mul") == "block1/bn1/mul"
    assert readable("jit(train)/while/body/closed_call/jvp(FastNet)/block1/jit(gelu)/max") == "block1/max"
    assert union_ms([(0, 2_000_000), (1_000_000, 3_000_000), (5_000_000, 6_000_000)]) == 4.0
