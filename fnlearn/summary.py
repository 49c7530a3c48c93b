"""Print a zoo model's layers with output shapes, parameters, bytes and FLOPs.

    python -m fnlearn.summary resnet18
    python -m fnlearn.summary fastnet --batch 512 --train
    python -m fnlearn.summary simple_net --input-shape 784

In code: `from fnlearn.summary import summary` (or `fnlearn.tools.summary`), then
`print(summary(model, jnp.zeros((1, 32, 32, 3))))`. How the FLOPs are counted:
`fnlearn.tools.summary`. Seconds (every module call is compiled once).
"""
import sys

import jax.numpy as jnp

from fnlearn import models
from fnlearn.cli import HelpFormatter, Parser, positive_int
from fnlearn.tools.summary import summary

__all__ = ["summary", "main"]


def main(argv=None):
    parser = Parser(prog="python -m fnlearn.summary", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", metavar="MODEL", help=f"a zoo model: {', '.join(models.names())}")
    parser.add_argument("--input-shape", default="32,32,3", help="one example's shape, comma-separated")
    parser.add_argument("--batch", type=positive_int, default=1, help="the batch the FLOPs are counted for")
    parser.add_argument("--train", action="store_true", help="training mode: BatchNorm on batch statistics")
    parser.add_argument("--depth", type=positive_int, help="rows down to this nesting depth (default: every module)")
    args = parser.parse_args(argv)
    if args.model not in models.names():
        sys.exit(f"error: unknown model {args.model!r}; choose one of: {', '.join(models.names())}")
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) <= 0:
        parser.error(f"--input-shape {args.input_shape!r}: pass positive whole numbers, comma-separated")
    try:
        result = summary(models.get(args.model), jnp.zeros((args.batch, *shape)), train=args.train, depth=args.depth)
    except Exception as e:  # the model refuses this input (as TypeError, ZeroDivisionError, a flax error...)
        why = ": ".join([type(e).__name__, *str(e).splitlines()[:1]])
        sys.exit(f"error: cannot summarise {args.model} on inputs of shape {(args.batch, *shape)}: {why}")
    print(result)


if __name__ == "__main__":
    main()
