"""Autograd, the JAX way: jax.grad values, accumulation, a custom VJP, stop_gradient."""
import jax
import jax.numpy as jnp
import numpy as np

from fnlearn.ops import relu
from fnlearn.train import accumulate_gradients


def test_grad_of_quadratic_per_element():
    # d(x² + 3x + 1)/dx = 2x + 3; summing gives each element its own derivative, as y.sum().backward().
    grad = jax.grad(lambda x: jnp.sum(x**2 + 3 * x + 1))(jnp.array([2.0, 3.0]))
    np.testing.assert_allclose(grad, [7.0, 9.0])


def test_grad_of_cubic():
    # d(x³ + 5x)/dx = 3x² + 5 = 17 at x = 2
    assert float(jax.grad(lambda x: x**3 + 5 * x)(2.0)) == 17.0


def test_grad_two_inputs():
    # z = x² + y³ + 5: dz/dx = 2x = 4, dz/dy = 3y² = 27 at (2, 3)
    dx, dy = jax.grad(lambda x, y: x**2 + y**3 + 5, argnums=(0, 1))(2.0, 3.0)
    assert (float(dx), float(dy)) == (4.0, 27.0)


def test_accumulate_gradients_sums_backward_passes():
    # torch: x = ones(2, requires_grad=True); x.sum().backward() three times -> x.grad == [3, 3]
    x = jnp.ones(2)
    loss, grads = accumulate_gradients(lambda p, batch: jnp.sum(p) * batch, x, jnp.ones(3))
    np.testing.assert_allclose(grads, [3.0, 3.0])
    assert float(loss) == 6.0
    # Different micro-batches contribute their own gradients: 1 + 2 + 3.
    _, grads = accumulate_gradients(lambda p, batch: jnp.sum(p * batch), x, jnp.array([[1.0, 1.0],
                                                                                        [2.0, 2.0],
                                                                                        [3.0, 3.0]]))
    np.testing.assert_allclose(grads, [6.0, 6.0])


def test_custom_relu_forward_and_gradient():
    x = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    np.testing.assert_array_equal(relu(x), jnp.maximum(x, 0))
    custom = jax.vmap(jax.grad(relu))(x)
    reference = jax.vmap(jax.grad(lambda v: jnp.maximum(v, 0)))(x)
    away = x != 0
    np.testing.assert_array_equal(custom[away], reference[away])
    np.testing.assert_array_equal(custom[x <= 0], 0.0)  # the backward rule passes only x > 0
    np.testing.assert_array_equal(custom[x > 0], 1.0)


def test_custom_relu_scales_incoming_gradient():
    # The VJP multiplies the upstream cotangent: d(3·relu(x))/dx = 3 where x > 0.
    grad = jax.grad(lambda x: jnp.sum(3.0 * relu(x)))(jnp.array([-1.0, 1.0, 4.0]))
    np.testing.assert_array_equal(grad, [0.0, 3.0, 3.0])


def test_stop_gradient_blocks_gradient():
    # torch.no_grad()/detach(): the stopped term is a constant to differentiation.
    x = 3.0
    assert float(jax.grad(lambda x: x**2 + jax.lax.stop_gradient(x**3))(x)) == 6.0
    assert float(jax.grad(lambda x: jax.lax.stop_gradient(x**2))(x)) == 0.0
