"""Profiling a few steps with `jax.profiler`, and the ops that took the time.

`jax.profiler.trace(folder, create_perfetto_trace=True)` records a trace that TensorBoard's
profile plugin opens (the `.xplane.pb` under `folder/plugins/profile/<run>/`; `tensorboard
--logdir folder`) and a `perfetto_trace.json.gz` beside it for ui.perfetto.dev. `op_intervals`
reads it back; `top_ops` ranks the compiled program's instructions by wall-clock time,
counting overlaps of one op once. On a CPU each trace event is named by its HLO
instruction; on a GPU its kernels may not be, and `top_ops` then finds none.
"""
import collections
import glob
import os
import re

import jax


def hlo_ops(hlo_text):
    """{instruction name: (opcode, op_name metadata)} of a compiled module's text.

    A fusion XLA made without metadata (bf16's float32 converts around a slice, say) takes
    the first op_name inside its fused computation, so it is counted where its work came from.
    """
    ops, calls, inner, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if header:
            computation = header.group(1)
        # The result type is one word, or a tuple "(f32[2]{0}, s32[])" (multi-output fusions, loops).
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (?:\(.*?\)|\S+) ([\w-]+)\(", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
            if op_name:
                inner.setdefault(computation, op_name.group(1))
            elif m.group(2) == "fusion" and (called := re.search(r"calls=%([\w.-]+)", line)):
                calls[m.group(1)] = called.group(1)
    for name, called in calls.items():
        ops[name] = ("fusion", inner.get(called, ""))
    return ops


def union_ms(intervals):
    """Total length in ms of the union of (start_ns, end_ns) intervals."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total / 1e6


def split_kernels(hlo_text):
    """Names of a compiled module's kernels that XLA:CPU splits over its threads (`outer_dimension_partitions`)."""
    return set(re.findall(r'%(\S+) = [^\n]*"outer_dimension_partitions"', hlo_text))


def event_intervals(events, split=frozenset()):
    """{op name: [(start_ns, end_ns), ...]} of trace events `(name, start_ns, end_ns)`.

    XLA:CPU traces an op it runs asynchronously twice: its start, and an "end: <name>" event when
    its result is ready. A library call (an Eigen convolution or matmul) is dispatched in its start
    event and counts until that end, including any wait for a thread busy with another op. A kernel
    in `split` runs one partition inside its start event while the pool runs the others alongside;
    its end can come long after, when a partition waited for a busy thread (one running a oneDNN
    convolution, which holds its thread throughout), so its start event is its run.
    """
    spans, ends = collections.defaultdict(list), collections.defaultdict(list)
    for name, start, end in events:
        if name.startswith("end: "):
            ends[name[5:]].append((start, end))
        else:
            spans[name].append((start, end))
    for name, done in ends.items():  # an async op runs from its last start before the end event
        if name in split:
            continue
        starts = sorted(s for s, _ in spans[name])
        spans[name] += [(max([s for s in starts if s <= start] or [start]), end) for start, end in done]
    return spans


def op_intervals(folder, split=frozenset()):
    """{event name: [(start_ns, end_ns), ...]} of the newest trace under `folder` (one `jax.profiler.trace`
    wrote), as `event_intervals` reads them; `split`: `split_kernels` of the program that ran."""
    paths = glob.glob(os.path.join(glob.escape(str(folder)), "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no jax.profiler trace (*.xplane.pb) under {folder}")
    data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
    return event_intervals(((e.name, e.start_ns, e.end_ns) for plane in data.planes for line in plane.lines
                            for e in line.events), split)


def inner_ops(intervals, ops):
    """`intervals` of the program's instructions less those that span others (a `while`, such as
    a scan's, a `conditional` or a `call`): those count through the ops they run."""
    return {name: iv for name, iv in intervals.items()
            if name in ops and ops[name][0] not in ("while", "conditional", "call")}


def top_ops(intervals, ops, steps=1, top=10):
    """`[(ms per step, instruction, opcode, op_name)]`, the `top` slowest of the program's instructions.

    Args:
      intervals: `op_intervals`'s result.
      ops: `hlo_ops` of the compiled program that ran.
      steps: how many steps the trace holds, to divide by.
    """
    rows = [(union_ms(iv) / steps, name, *ops[name]) for name, iv in inner_ops(intervals, ops).items()]
    return sorted(rows, key=lambda row: -row[0])[:top]


_STRUCTURE = re.compile(r"cond|while|body|closed_call|branch_\d+_fun|.*\(.*")  # jit(f), jvp(Model), ...


def readable(op_name):
    """An op's metadata as the layer it came from: "backward block2/conv1/conv_general_dilated"."""
    where = "/".join(part for part in op_name.split("/") if part and not _STRUCTURE.fullmatch(part))
    return ("backward " if "transpose(" in op_name else "") + where


def report(folder, hlo_text, steps, first_step):
    """The lines a training loop logs after tracing `steps` steps from `first_step` (1-based) into
    `folder`: where the trace is, how to open it, and its slowest ops in ms a step."""
    rows = top_ops(op_intervals(folder, split_kernels(hlo_text)), hlo_ops(hlo_text), steps)
    span = f"step {first_step}" if steps == 1 else f"steps {first_step}-{first_step + steps - 1}"
    return (f"profile of {span} in {folder} (open: tensorboard --logdir {folder}, the profile tab; or its "
            f"perfetto_trace.json.gz in ui.perfetto.dev); the slowest ops, ms a step:\n"
            + ("\n".join(f"{ms:9.2f}  {opcode:<12} {name:<28} {readable(op_name)}"
                         for ms, name, opcode, op_name in rows) or "  (none named by the program's HLO here)"))
