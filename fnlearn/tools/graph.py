"""A function's computation as a Graphviz graph: torchviz's `make_dot`, for jaxprs and for HLO.

`jaxpr_dot(fn, *args)` draws the traced program: one node per primitive with its output
shape, one box per Flax module (the name stack Flax gives each call), arrows along the data.
A call of a nested jaxpr (jit, a custom derivative, a platform-dependent choice) is one
node, named. `hlo_dot(fn, *args)` draws the program XLA compiles and runs for this backend:
the optimised HLO's entry computation, fusions as single nodes. `render(dot, path)` writes
SVG, PNG or PDF through Graphviz's `dot` program.
"""
import itertools
import pathlib
import re
import shutil
import subprocess

import jax
from jax.extend import core as jcore


class GraphError(RuntimeError):
    """A graph could not be rendered; the message says what to install or pass."""


def _shape(aval):
    return f"{aval.dtype}[{','.join(map(str, aval.shape))}]" if hasattr(aval, "shape") else str(aval)


def _label(eqn):
    name = eqn.primitive.name
    if isinstance(eqn.params.get("name"), str):  # jit[name=...], custom_jvp_call[name=...]
        name = f"{name}[{eqn.params['name']}]"
    return f"{_escape(name)}\\n{', '.join(_shape(v.aval) for v in eqn.outvars)}"


def jaxpr_dot(fn, *args, strip_top=True):
    """The jaxpr of `fn(*args)` as DOT source, its equations grouped by Flax module.

    Args:
      fn: the function (a model's forward, a train step).
      *args: example arguments (arrays or `jax.ShapeDtypeStruct`s; nothing is computed).
      strip_top: drop the outermost module's name (the model class) from every box's path.
    Returns:
      DOT source text.
    """
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    names, lines, clusters = {}, [], {}

    def node_of(var):
        if isinstance(var, jcore.Literal):
            name = f"lit{len(names)}_{id(var)}"
            lines.append(f'  {name} [label="{_escape(var.val)}", shape=plaintext];')
            return name
        return names[var]

    for i, var in enumerate(jaxpr.invars):
        names[var] = f"in{i}"
        lines.append(f'  in{i} [label="input {i}\\n{_shape(var.aval)}", shape=box, style=filled, fillcolor="#dde8f6"];')
    for i, var in enumerate(jaxpr.constvars):
        names[var] = f"const{i}"
        lines.append(f'  const{i} [label="constant\\n{_shape(var.aval)}", shape=box, style=filled, fillcolor="#eeeeee"];')
    for i, eqn in enumerate(jaxpr.eqns):
        node = f"op{i}"
        path = str(eqn.source_info.name_stack).split("/")
        path = [p for p in (path[1:] if strip_top else path) if p]
        clusters.setdefault(tuple(path), []).append(f'{node} [label="{_label(eqn)}"];')
        for var in eqn.invars:
            lines.append(f"  {node_of(var)} -> {node};")
        for var in eqn.outvars:
            names[var] = node
    for i, var in enumerate(jaxpr.outvars):
        lines.append(f'  out{i} [label="output {i}\\n{_shape(var.aval)}", shape=box, style=filled, fillcolor="#dff0d8"];')
        lines.append(f"  {node_of(var)} -> out{i};")
    return "digraph jaxpr {\n  node [shape=ellipse, fontsize=10];\n" + _clusters(clusters) + "\n".join(lines) + "\n}\n"


def _clusters(clusters):
    """Nested `subgraph cluster_...` blocks, one per module path, holding that module's nodes."""
    tree = {}
    for path, nodes in clusters.items():
        level = tree
        for part in path:
            level = level.setdefault(part, {})
        level.setdefault(None, []).extend(nodes)
    counter = itertools.count()

    def write(level, indent):
        out = [f"{indent}{n}" for n in level.get(None, [])]
        for name, sub in level.items():
            if name is not None:
                out.append(f'{indent}subgraph cluster_{next(counter)} {{ label="{_escape(name)}"; style=rounded;')
                out.extend(write(sub, indent + "  "))
                out.append(f"{indent}}}")
        return out

    return "\n".join(write(tree, "  ")) + "\n"


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")


def hlo_dot(fn, *args):
    """The entry computation of `fn`'s optimised HLO for this backend as DOT source.

    Each instruction is a node (a fusion or a loop one node, labelled with its kind), its operands the arrows.
    """
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    lines, known = [], set()
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        kind = re.search(r"kind=(\w+)", rest)
        shape = re.sub(r"\{[^}]*\}", "", shape)  # layouts
        lines.append(f'  "{name}" [label="{_escape(op)}{" " + kind.group(1) if kind else ""}\\n{_escape(shape)}"];')
        for operand in re.findall(r"%([\w.\-]+)", rest.split(", metadata=")[0]):
            if operand in known:
                lines.append(f'  "{operand}" -> "{name}";')
        known.add(name)
    return "digraph hlo {\n  node [shape=box, fontsize=10];\n" + "\n".join(lines) + "\n}\n"


def _escape(text):
    """`text` inside a double-quoted DOT string."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


def render(dot, path):
    """Writes the DOT source `dot` to `path` (.dot as it is; .svg, .png, .pdf through Graphviz's `dot`).

    Raises:
      GraphError: the format needs the `dot` program and it is not installed.
    """
    path = pathlib.Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv"):
        path.write_text(dot)
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise GraphError(f"{path}: write a .svg, .png, .pdf or .dot file")
    program = shutil.which("dot")
    if program is None:
        raise GraphError(f"writing {path} needs Graphviz's `dot` program, which is not on PATH: install graphviz "
                         f"(apt-get install graphviz, brew install graphviz), or write a .dot file instead")
    result = subprocess.run([program, f"-T{fmt}", "-o", str(path)], input=dot, text=True, capture_output=True)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()
        raise GraphError(f"dot could not write {path}: {message[-1] if message else f'exit code {result.returncode}'}")
    return path
