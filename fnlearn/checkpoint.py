"""Checkpoints of a training state with orbax: one per epoch, written atomically."""
import pathlib

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names its folder."""


def _arrays(state):
    """The parts of a TrainState that are data (apply_fn and tx are code, rebuilt by the caller)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "batch_stats": state.batch_stats, "ema_params": state.ema_params}


class Checkpoints:
    """Saves and restores `(state, meta)` pairs under `directory/<epoch>`.

    Orbax writes each checkpoint to a temporary folder and renames it when complete,
    so a run killed mid-save leaves the previous checkpoints loadable.
    """

    def __init__(self, directory, max_to_keep=2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def save(self, epoch, state, meta):
        """Saves the state after `epoch` (1-based) with a JSON-able `meta` dict, and waits for it."""
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def latest_epoch(self):
        """The last completed epoch saved here, or None."""
        return self._manager.latest_step()

    def restore(self, state, epoch=None):
        """Restores into the structure of `state` (a freshly built TrainState); returns (state, meta)."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(epoch)
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
        try:
            restored = self._manager.restore(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            raise CheckpointError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}. "
                                  f"Delete it to resume from an earlier one.") from e
        return state.replace(**restored.state), restored.meta

    def close(self):
        self._manager.close()
