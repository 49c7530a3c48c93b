"""Fine-tuning: groups by path, frozen subtrees and BatchNorm, a lower backbone rate, a new head."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fnlearn import models
from fnlearn.train import FROZEN, TrainState, cross_entropy, freeze, load_pretrained, make_train_step, \
    param_groups, partition
from fnlearn.train.finetune import matches

X = jax.random.normal(jax.random.key(1), (8, 8, 8, 3)) * 3 + 1  # far from BatchNorm's initial statistics
Y = jnp.arange(8) % 4


def _tiny(num_classes=4):
    model = models.get("resnet_tiny", num_classes=num_classes)
    return model, model.init(jax.random.key(0), X[:1])


def _train(state, steps=3):
    step = jax.jit(make_train_step(grad_norm=False))
    for _ in range(steps):
        state, _ = step(state, (X, Y))
    return state


def _changed(before, after):
    """{path: whether the leaf changed}, paths "/"-joined."""
    flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after))[0]
    return {"/".join(k.key for k in path): changed for path, changed in flat}


@pytest.mark.parametrize("path, pattern, hit", [
    ("fc/kernel", "fc", True), ("fc/kernel", "fc/*", True), ("layer1_0/conv1/kernel", "layer1*", True),
    ("layer2_0/bn1/scale", "layer[12]_*", True), ("layer3_0/bn1/scale", "layer[12]_*", False),
    ("conv1/kernel", "*", True), ("layer1_0/conv1/kernel", "conv1", False), ("fcx/kernel", "fc", False)])
def test_patterns_match_a_path_or_its_leading_parts(path, pattern, hit):
    assert matches(path, pattern) == hit


def test_groups_take_the_first_matching_rule():
    _, variables = _tiny()
    groups = param_groups(variables["params"], [("fc", "head"), ("layer1*", FROZEN)], "rest")
    assert groups["fc"] == {"kernel": "head", "bias": "head"}
    assert set(jax.tree.leaves(groups["layer1_0"])) == {FROZEN}
    assert set(jax.tree.leaves(groups["layer2_0"])) == {"rest"} and groups["conv1"]["kernel"] == "rest"


def test_head_only_leaves_the_frozen_backbone_and_its_statistics_unchanged():
    model, variables = _tiny()
    rules = [("fc", "head")]
    state = TrainState.create(apply_fn=freeze(model.apply, variables["params"], rules, FROZEN), variables=variables,
                              tx=partition({"head": optax.sgd(0.1, momentum=0.9)}, variables["params"], rules, FROZEN))
    trained = _train(state)
    changed = _changed(state.params, trained.params)
    assert changed.pop("fc/kernel") and changed.pop("fc/bias")
    assert not any(changed.values())
    assert not any(_changed(state.batch_stats, trained.batch_stats).values())
    # Frozen BatchNorm normalises with its running statistics: train mode gives eval mode's output.
    train_out, _ = state.apply_fn(variables, X, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(train_out, model.apply(variables, X, train=False), atol=1e-6)


def test_frozen_params_get_no_gradient_so_the_grad_norm_is_the_heads():
    # As clip_grad_norm_ sees only params with a .grad: clipping scales the head by its own norm.
    model, variables = _tiny()
    rules = [("fc", "head")]
    apply = freeze(model.apply, variables["params"], rules, FROZEN)
    state = TrainState.create(apply_fn=apply, variables=variables,
                              tx=partition({"head": optax.sgd(0.1)}, variables["params"], rules, FROZEN))
    _, metrics = jax.jit(make_train_step())(state, (X, Y))

    def head_loss(fc):
        out, _ = apply({**variables, "params": {**variables["params"], "fc": fc}}, X, train=True,
                       mutable=["batch_stats"])
        return cross_entropy(out, Y)

    head_norm = optax.tree.norm(jax.grad(head_loss)(variables["params"]["fc"]))
    np.testing.assert_allclose(metrics["grad_norm"], head_norm, rtol=1e-5)
    backbone = jax.grad(lambda p: cross_entropy(apply({**variables, "params": p}, X, train=True,
                                                      mutable=["batch_stats"])[0], Y))(variables["params"])
    assert not any(jnp.any(g != 0) for k, v in backbone.items() if k != "fc" for g in jax.tree.leaves(v))


def test_without_freezing_batch_norm_its_statistics_move():
    """The counter-test: the same step with the model's plain apply updates the running statistics."""
    model, variables = _tiny()
    rules = [("fc", "head")]
    state = TrainState.create(apply_fn=model.apply, variables=variables,
                              tx=partition({"head": optax.sgd(0.1)}, variables["params"], rules, FROZEN))
    trained = _train(state, steps=1)
    assert all(_changed(state.batch_stats, trained.batch_stats).values())
    assert not any(v for k, v in _changed(state.params, trained.params).items() if not k.startswith("fc"))


def test_a_frozen_stage_is_unchanged_and_the_rest_trains():
    model, variables = _tiny()
    rules = [("conv1", FROZEN), ("bn1", FROZEN), ("layer1_*", FROZEN)]
    state = TrainState.create(apply_fn=freeze(model.apply, variables["params"], rules, "train"), variables=variables,
                              tx=partition({"train": optax.adam(1e-2)}, variables["params"], rules, "train"))
    trained = _train(state)
    for path, changed in _changed(state.params, trained.params).items():
        assert changed == (path.startswith("layer2_0") or path.startswith("fc")), path
    for path, changed in _changed(state.batch_stats, trained.batch_stats).items():
        assert changed == path.startswith("layer2_0"), path
    adam = trained.opt_state.inner_states["train"].inner_state[0]
    assert jax.tree.leaves(adam.mu["layer1_0"]) == [] and jax.tree.leaves(adam.mu["layer2_0"])  # none for frozen ones


def test_the_backbone_trains_at_its_own_rate():
    model, variables = _tiny()
    rules = [("fc", "head")]
    lr, scale = 0.1, 0.1
    tx = partition({"head": optax.sgd(lr), "backbone": optax.sgd(lr * scale)}, variables["params"], rules, "backbone")
    one_rate = TrainState.create(apply_fn=model.apply, variables=variables, tx=optax.sgd(lr))
    two_rates = one_rate.replace(tx=tx, opt_state=tx.init(variables["params"]))
    delta_one = jax.tree.map(jnp.subtract, _train(one_rate, 1).params, variables["params"])
    delta_two = jax.tree.map(jnp.subtract, _train(two_rates, 1).params, variables["params"])
    np.testing.assert_allclose(delta_two["fc"]["kernel"], delta_one["fc"]["kernel"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(delta_two["layer2_0"]["conv1"]["kernel"], scale * delta_one["layer2_0"]["conv1"]["kernel"],
                               rtol=1e-4, atol=1e-7)  # float32 rounding of params - old params


def test_a_group_without_a_transform_or_a_transform_without_a_group_is_refused():
    _, variables = _tiny()
    with pytest.raises(ValueError, match=r"no transform for the parameter groups \['backbone'\]"):
        partition({"head": optax.sgd(0.1)}, variables["params"], [("fc", "head")], "backbone")
    with pytest.raises(ValueError, match=r"no parameter is in the groups \['head'\]"):  # a typo in a pattern
        partition({"head": optax.sgd(0.1)}, variables["params"], [("fx", "head")], FROZEN)


def test_batch_norm_is_frozen_only_where_all_its_params_are():
    model, variables = _tiny()
    rules = [("*/scale", FROZEN), ("layer1_0/bn1", FROZEN), ("bn1/*", FROZEN)]
    apply = freeze(model.apply, variables["params"], rules, "train")
    _, updates = apply(variables, X, train=True, mutable=["batch_stats"])
    changed = _changed(variables["batch_stats"], updates["batch_stats"])
    for path, moved in changed.items():  # bn1 and layer1_0/bn1 are frozen whole; the others' biases train
        assert moved == (not path.startswith(("bn1/", "layer1_0/bn1/"))), path


def test_pretrained_weights_under_a_new_head():
    _, pretrained = _tiny(num_classes=10)
    _, fresh = _tiny(num_classes=3)
    loaded = load_pretrained(fresh, pretrained, fresh=("fc",))
    assert loaded["params"]["fc"]["kernel"].shape == (16, 3)
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(loaded["params"]["layer2_0"]["conv2"]["kernel"],
                                  pretrained["params"]["layer2_0"]["conv2"]["kernel"])
    np.testing.assert_array_equal(loaded["batch_stats"]["bn1"]["var"], pretrained["batch_stats"]["bn1"]["var"])
    with pytest.raises(ValueError, match=r"params/fc/kernel: saved \(16, 10\), model \(16, 3\)"):
        load_pretrained(fresh, pretrained)  # the head kept: it does not fit
    deeper = models.ResNet(stage_sizes=(1, 1, 1), block_cls=models.BasicBlock, width=8, num_classes=3)
    with pytest.raises(ValueError, match=r"missing from the pretrained weights: .*params/layer3_0/conv1/kernel"):
        load_pretrained(deeper.init(jax.random.key(0), X[:1]), pretrained, fresh=("fc",))
    with pytest.raises(ValueError, match="the head pattern 'head' matches no parameter"):
        load_pretrained(fresh, pretrained, fresh=("head",))
