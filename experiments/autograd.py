"""Autograd the JAX way: the PyTorch autograd tutorial's values from `jax.grad`, checked.

    python -m experiments.autograd [--x 2.0]

Takes a few seconds on a 2-core CPU (start-up and a few tiny compilations). Prints and
checks, raising ValueError on any mismatch: d(x²+3x+1)/dx at [2, 3] = [7, 9];
d(x³+5x)/dx = 3x²+5 (17 at x = 2); z = x²+y³+5 at (2, 3) has grads (4, 27); three
accumulated backward passes of sum(ones(2)) give [3, 3]; the custom-VJP ReLU's grads
equal those of jnp.maximum(x, 0) away from 0; stop_gradient gives a zero gradient.
"""
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from fnlearn.ops import relu
from fnlearn.train import accumulate_gradients


def autograd_values(x_cubic):
    """Each tutorial gradient from jax.grad, with its analytic value.

    Args:
      x_cubic: where to differentiate x³ + 5x.
    Returns:
      dict name -> (label, computed, expected).
    """
    x = jnp.array([2.0, 3.0])
    relu_points = jnp.array([-2.0, -0.5, 0.0, 0.5, 2.0])
    ones = jnp.ones(2)
    return {
        # Summing makes the gradient per-element, as y.sum().backward() does.
        "quadratic": ("d(x^2+3x+1)/dx at [2,3]",
                      jax.grad(lambda v: jnp.sum(v**2 + 3 * v + 1))(x), 2 * x + 3),
        "cubic": (f"d(x^3+5x)/dx at {x_cubic:g}", jax.grad(lambda v: v**3 + 5 * v)(x_cubic), 3 * x_cubic**2 + 5),
        "two_inputs": ("dz/d(x,y), z=x^2+y^3+5 at (2,3)",
                       jnp.stack(jax.grad(lambda a, b: a**2 + b**3 + 5, argnums=(0, 1))(2.0, 3.0)), [4.0, 27.0]),
        # Three micro-batches, the analogue of calling loss.backward() three times.
        "accumulated": ("3 accumulated grads of sum(ones(2))",
                        accumulate_gradients(lambda p, _: jnp.sum(p), ones, jnp.zeros(3))[1], [3.0, 3.0]),
        "custom_relu": ("custom relu grad at [-2,-.5,0,.5,2]",
                        jax.vmap(jax.grad(relu))(relu_points), jnp.where(relu_points > 0, 1.0, 0.0)),
        "stop_gradient": ("d(stop_gradient(x^2))/dx at 3",
                          jax.grad(lambda v: jax.lax.stop_gradient(v**2))(3.0), 0.0),
    }


def main(argv=None):
    """Computes, checks and prints the tutorial's gradients.

    Args:
      argv: command-line arguments; None reads sys.argv.
    Returns:
      dict name -> computed value (a list of floats, or a float for scalars): quadratic,
      cubic, two_inputs, accumulated, custom_relu, stop_gradient.
    """
    parser = cli.make_parser("autograd", __doc__)
    # Bounded so that the derivatives (3x² + 5 among them) stay finite in float32.
    parser.add_argument("--x", type=cli.float_between(-1e6, 1e6), default=2.0,
                        help="point at which to differentiate x³ + 5x")
    args = parser.parse_args(argv)

    results = {}
    for name, (label, computed, expected) in autograd_values(args.x).items():
        computed, expected = np.asarray(computed, np.float64), np.asarray(expected, np.float64)
        if not np.allclose(computed, expected, rtol=1e-6):
            raise ValueError(f"{label}: got {computed}, expected {expected}")
        results[name] = computed.tolist()
        print(f"{label:38s} = {computed.tolist()}  (expected {expected.tolist()})")
    # The custom rule must agree with JAX's own derivative wherever ReLU is differentiable.
    points = jnp.array([-2.0, -0.5, 0.5, 2.0])
    reference = jax.vmap(jax.grad(lambda v: jnp.maximum(v, 0)))(points)
    if not np.array_equal(jax.vmap(jax.grad(relu))(points), reference):
        raise ValueError("custom relu gradient differs from jax.grad(jnp.maximum(x, 0)) away from 0")
    print("custom relu grad == jax.grad(jnp.maximum(x, 0)) away from 0: ok")
    return results


if __name__ == "__main__":
    main()
