"""Activation checkpointing: the same gradients from fewer activations kept for the backward pass."""
import dataclasses

import jax
import numpy as np
import pytest

from fnlearn import models
from fnlearn.recipes.cifar import CifarConfig, backward_bytes
from fnlearn.train import cross_entropy


@pytest.mark.parametrize("name", ["resnet_tiny", pytest.param("fastnet_tiny", marks=pytest.mark.slow)])
def test_remat_gives_the_same_params_and_gradients(name):
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (8,), 0, 10)
    plain, remat = models.get(name), models.get(name, remat=True)
    variables = plain.init(jax.random.key(2), x[:1])
    assert jax.tree.structure(variables) == jax.tree.structure(remat.init(jax.random.key(2), x[:1]))

    def grads(model):
        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return cross_entropy(out, y)
        return jax.jit(jax.grad(loss))(variables["params"])

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# At least what the plain nets keep in their first layers: resnet_tiny's first block 7 (64, 32, 32, 8)
# float32 tensors; fastnet_tiny's whitening stem its conv output and GELU, 2 (64, 31, 31, 24).
# The stem and head are not checkpointed: fastnet_tiny's stem is about half of what remat
# leaves, so remat takes the rest (its blocks) down to under half.
@pytest.mark.parametrize("name, at_least, stem", [("resnet_tiny", 7 * 64 * 32 * 32 * 8 * 4, 0),
                                                  ("fastnet_tiny", 2 * 64 * 31 * 31 * 24 * 4, 2 * 64 * 31 * 31 * 24 * 4)])
def test_remat_keeps_fewer_activations_for_the_backward_pass(name, at_least, stem):
    cfg = CifarConfig(model=name, batch_size=64)
    plain, remat = backward_bytes(cfg), backward_bytes(dataclasses.replace(cfg, remat=True))
    assert plain > at_least and remat - stem < 0.55 * (plain - stem), (remat, plain)
