"""Checkpoints of a training state with orbax: one per epoch, written atomically."""
import pathlib
import sys
import traceback

import jax
import orbax.checkpoint as ocp


def _first_line(error):
    """The gist of an orbax/TensorStore error, whose message can run to hundreds of lines."""
    text = str(error).split(" See full TensorStore details")[0].strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}"


def _ignoring_failed_reads(hook):
    """`hook` (a `sys.unraisablehook`) less the errors of reads left in flight by a failed restore.

    Orbax stops at the first unreadable array and closes its event loop; its other reads
    then fail onto the closed loop or are dropped unawaited, and Python prints a
    traceback of hundreds of lines for each, which say nothing the first error did not.
    """
    def filtered(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
        in_orbax = any("/orbax/" in frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback))
        if not (closed_loop or in_orbax):
            hook(unraisable)
    return filtered


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names its folder."""


def _arrays(state):
    """The parts of a TrainState that are data (apply_fn and tx are code, rebuilt by the caller)."""
    arrays = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
              "batch_stats": state.batch_stats, "ema_params": state.ema_params}
    if state.loss_scale is not None:  # float16 runs only, so other checkpoints keep their layout
        arrays["loss_scale"] = state.loss_scale
    return arrays


class Checkpoints:
    """Saves and restores `(state, meta)` pairs under `directory/<epoch>`.

    Orbax writes each checkpoint to a temporary folder and renames it when complete,
    so a run killed mid-save leaves the previous checkpoints loadable.
    """

    def __init__(self, directory, max_to_keep=2, create=True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

    def save(self, epoch, state, meta):
        """Saves the state after `epoch` (1-based) with a JSON-able `meta` dict, and waits for it."""
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def latest_epoch(self):
        """The last completed epoch saved here, or None."""
        return self._manager.latest_step()

    def meta(self, epoch):
        """The JSON `meta` dict saved with `epoch`, read without the arrays."""
        try:
            return self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            raise CheckpointError(f"cannot read checkpoint {self.directory / str(epoch)}: {_first_line(e)}") from None

    def restore(self, state, epoch=None):
        """Restores into the structure of `state` (a freshly built TrainState); returns (state, meta)."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(epoch)
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
        previous_hook, sys.unraisablehook = sys.unraisablehook, _ignoring_failed_reads(sys.unraisablehook)
        try:
            restored = self._manager.restore(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            earlier = [s for s in self._manager.all_steps() if s < epoch]
            advice = (f"delete {path} to resume from epoch {max(earlier)}" if earlier else
                      f"delete {self.directory} to start the run again")
            # The filter stays: the reads still in flight finish after this returns.
            raise CheckpointError(f"cannot restore checkpoint {path}: {_first_line(e)}; {advice}") from None
        sys.unraisablehook = previous_hook
        return state.replace(**restored.state), restored.meta

    def close(self):
        self._manager.close()
