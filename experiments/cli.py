"""What every experiment's command line shares: a `--help` that shows the module's usage
and each flag's default, and number types that refuse bad values before any work starts."""
import argparse
import dataclasses
import json
import os
import re
import tempfile
import typing
from pathlib import Path

import jax

from fnlearn.checkpoint import save_variables
from fnlearn.cli import (HelpFormatter, Parser, finite_float, float_between, fraction, int_between,  # noqa: F401
                         non_negative_float, non_negative_int, positive_float, positive_int, seed)


def make_parser(name, doc):
    """The parser of `python -m experiments.NAME`; its `--help` opens with the module docstring."""
    return Parser(prog=f"python -m experiments.{name}", description=doc, formatter_class=HelpFormatter)


def add_config_flags(parser, config_cls, help, choices=None):
    """A `--field-name` flag for each field of the dataclass `config_cls` (a bool one as
    `--x/--no-x`), with `help(field)` as its help. None has a default: `config_overrides`
    returns the fields given, to apply to a preset or the defaults with `dataclasses.replace`."""
    choices = choices or {}
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        if hints[field.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help(field))
        else:
            kind = {int: int, float: float}.get(hints[field.name], str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices.get(field.name),
                                metavar=field.name.upper() if field.name in choices else None, help=help(field))


def config_overrides(args, config_cls):
    """The fields of `config_cls` given on the command line (see `add_config_flags`), by name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}


def write_json(path, obj):
    """Writes JSON through a temporary file, so a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def check_output_file(parser, flag, path):
    """Refuses an output file (written with `write_json` at the end of a run) that is a folder, lies in
    no existing folder, or whose folder cannot be written (a probe file is made there and removed),
    before any work starts."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        parser.error(f"{flag} {path}: pass a file path in an existing folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fnlearn-probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        parser.error(f"{flag} {path} cannot be written ({err.strerror} in {path.parent}): "
                     "pass a path in a folder you can write")
    return path


def check_workdir(parser, workdir):
    """Refuses a `--workdir` that is, or lies inside, a file, or where no folder can be made,
    before any work starts (a probe folder is made in it, or in its nearest existing parent,
    and removed)."""
    workdir = Path(workdir)
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == workdir else f"lies inside the file {existing}"
        parser.error(f"--workdir {workdir} {what}: pass a folder (it is created if missing)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fnlearn-probe-", dir=existing))
    except OSError as err:
        parser.error(f"--workdir {workdir} cannot be written ({err.strerror} in {existing}): "
                     "pass a folder you can write")
    return workdir


def debug_flags(parser, profile_help):
    """`--tensorboard-every`, `--detect-anomaly` and `--profile`: the developer tools every training
    experiment takes (see the README's "Developer tools")."""
    group = parser.add_argument_group("debugging (fnlearn.tools)")
    group.add_argument("--tensorboard-every", type=non_negative_int, default=0, metavar="N",
                       help="every N steps, write the step's loss, accuracy, gradient norm and learning rate, each "
                            "layer's gradient norm, mean and max-abs, and histograms of the weights and gradients, "
                            "to WORKDIR/tensorboard (0: off)")
    group.add_argument("--detect-anomaly", action="store_true",
                       help="check every step for NaN/Inf; at the first, rerun that step layer by layer, name where "
                            "it appeared (forward or backward) and save the last finite weights to "
                            "WORKDIR/last_finite (slower: a sync after every call)")
    group.add_argument("--profile", action="store_true", help=profile_help)


def diverged_message(error, workdir, meta):
    """The one-line error for a `TrainingDiverged`; where it carries the last finite state (with
    `--detect-anomaly`), its variables are first saved to WORKDIR/last_finite, with `meta`."""
    if error.state is None or jax.process_count() > 1:
        return f"error: {error}"
    path = Path(workdir) / "last_finite"
    save_variables(path, jax.device_get(error.state.variables), {**meta, "step": error.step})
    return f"error: {error}. The last finite weights are in {path} (fnlearn.checkpoint.load_variables)"


def process_flags(parser):
    """`--coordinator`, `--num-processes`, `--process-id`: one run over several processes, as
    torchrun's flags; each defaults to JAX's variable (JAX_COORDINATOR_ADDRESS, ...)."""
    group = parser.add_argument_group("several processes (jax.distributed, torchrun's analogue; all three or none)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's host and a free port, the same in every process "
                            "(default: $JAX_COORDINATOR_ADDRESS; unset: this process alone)")
    group.add_argument("--num-processes", type=positive_int, help="processes in the run (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=non_negative_int,
                       help="this process's rank, 0 to N-1; process 0 writes the outputs (default: $JAX_PROCESS_ID)")


# Each process flag's JAX variable, read when the flag is not given, and its type.
PROCESS_VARIABLES = {"coordinator": ("JAX_COORDINATOR_ADDRESS", str),
                     "num_processes": ("JAX_NUM_PROCESSES", positive_int),
                     "process_id": ("JAX_PROCESS_ID", non_negative_int)}


def join_processes(parser, args):
    """Joins the run's other processes through `jax.distributed.initialize` when `process_flags`
    name them; after it, `jax.devices()` lists every process's devices. Call it before any
    device is used. Returns whether it joined."""
    for name, (variable, kind) in PROCESS_VARIABLES.items():
        if getattr(args, name) is None and (text := os.environ.get(variable)) is not None:
            try:
                setattr(args, name, kind(text))
            except argparse.ArgumentTypeError as err:  # named as the user set it, not as a flag they never passed
                parser.error(f"${variable} {err}: unset it or pass --{name.replace('_', '-')}")
    flags = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if all(value is None for value in flags.values()):
        return False
    if missing := [flag for flag, value in flags.items() if value is None]:
        parser.error(f"a run of several processes needs {', '.join(missing)} too: pass all three of "
                     f"--coordinator, --num-processes, --process-id, or none")
    host, _, port = args.coordinator.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 address, [::1]
    if not (host and port.isdigit() and 0 < int(port) < 65536 and (bracketed or re.fullmatch(r"[\w.-]+", host))):
        parser.error(f"--coordinator {args.coordinator!r} is not HOST:PORT: pass process 0's host and a free port, "
                     f"e.g. 10.0.0.1:1234")
    if args.process_id >= args.num_processes:
        parser.error(f"--process-id {args.process_id} is not below --num-processes {args.num_processes}: "
                     f"ranks run from 0 to {args.num_processes - 1}")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    return True
