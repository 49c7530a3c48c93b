"""What every command line of fnlearn shares (the experiments', the server's, the summary's): a
`--help` that keeps the module's usage and shows each flag's default, user errors in two lines,
and number types that refuse bad values before any work starts."""
import argparse
import math
import operator


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's line breaks (its usage examples) and adds each flag's default."""

    def _get_help_string(self, action):
        # "(default: None)" says nothing: such a flag's help says what leaving it out does.
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose user errors take two lines, not the whole usage block and then the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag)\n")


def _number(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive whole number")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
finite_float = _number(float, lambda v: True, "a finite number")
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def int_between(low, high):
    """A whole number in low..high, both included."""
    return _number(int, lambda v: low <= v <= high, f"a whole number in {low}..{high}")


def float_between(low, high):
    """A finite number in low..high, both included."""
    return _number(float, lambda v: low <= v <= high, f"a number in {low:g}..{high:g}")


SEEDS = range(2**32)  # the usual seed range; jax.random.key overflows past 2**63
seed = int_between(SEEDS.start, SEEDS.stop - 1)


def check_seed(config, field):
    """The configs' check of a seed given in code: raises ValueError unless `config.field` is in
    SEEDS, and stores it as a Python int (a NumPy one would not go into the saved JSON)."""
    value = getattr(config, field)
    try:
        ok = not isinstance(value, bool) and operator.index(value) in SEEDS  # NumPy's integers too
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"--{field.replace('_', '-')} {value!r}: must be a whole number in 0..2**32-1")
    object.__setattr__(config, field, operator.index(value))  # the configs are frozen dataclasses
