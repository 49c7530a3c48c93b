"""Checkpoints with orbax, written atomically: a training state per epoch (`Checkpoints`),
and a model's variables alone, for sharing (`save_variables` / `load_variables`)."""
import contextlib
import logging
import pathlib
import shutil
import sys
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from fnlearn.pytrees import leaf_shapes, shape_mismatches


def _first_line(error):
    """The gist of an orbax/TensorStore error, whose message can run to hundreds of lines."""
    text = str(error).split(" See full TensorStore details")[0].strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip('.') if text else ''}"


@contextlib.contextmanager
def _quiet_failed_reads(path):
    """Runs an orbax restore of `path`; where it fails, quiets the reads it left in flight.

    Orbax stops at the first unreadable array and closes its event loop; its other reads then
    fail onto the closed loop (Python's unraisable hook), even before the restore raises, or
    are dropped unawaited (asyncio's log), each with a traceback of hundreds of lines that
    says nothing the first error did not. They end after the restore, so the filters stay.
    """
    hook, path, log = sys.unraisablehook, str(path), logging.getLogger("asyncio")

    def unraisable(report):
        closed_loop = isinstance(report.exc_value, RuntimeError) and "Event loop is closed" in str(report.exc_value)
        in_orbax = any("/orbax/" in frame.filename for frame in traceback.extract_tb(report.exc_traceback))
        if not (closed_loop or in_orbax):
            hook(report)

    def quiet(record):  # a dropped read can be logged before the restore raises
        return path not in record.getMessage()

    sys.unraisablehook = unraisable
    log.addFilter(quiet)
    yield  # where the restore raises, the filters stay: its failed reads end after it
    sys.unraisablehook = hook
    log.removeFilter(quiet)


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, or does not fit the model; the message names its folder."""


def _handlers(item):
    """Orbax's handlers for a checkpoint of the arrays `item` and its JSON "meta", so its metadata reads
    before anything is restored."""
    return {item: ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _check_fits(saved_tree, template, path):
    """Raises CheckpointError listing every leaf of the checkpoint at `path` that does not fit `template`."""
    if lines := shape_mismatches(leaf_shapes(saved_tree), leaf_shapes(template)):
        raise CheckpointError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(lines))


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
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
            item_handlers=_handlers("state"))

    def save(self, epoch, state, meta):
        """Saves the state after `epoch` (1-based) with a JSON-able `meta` dict, and waits for it.

        Raises:
          CheckpointError: the folder holds this epoch or a later one (orbax would save nothing).
        """
        saved = self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"{self.directory} already holds epoch {self.latest_epoch()}, so epoch {epoch} "
                                  "was not saved: resume from it, or pass another --workdir")

    def latest_epoch(self):
        """The last completed epoch saved here, or None."""
        return self._manager.latest_step()

    def meta(self, epoch):
        """The JSON `meta` dict saved with `epoch`, read without the arrays."""
        try:
            return self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            raise CheckpointError(f"cannot read checkpoint {self.directory / str(epoch)}: {_first_line(e)}. Delete "
                                  f"that folder to resume from the epoch before it") from None

    def restore(self, state, epoch=None):
        """Restores into the structure of `state` (a freshly built TrainState); returns (state, meta)."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(epoch)
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
        try:
            saved = self._manager.metadata(epoch).item_metadata["state"].tree
        except Exception:  # orbax raises many types; a checkpoint this unreadable fails the restore below
            saved = None
        if saved is not None:
            _check_fits(saved, template, path)
        try:
            with _quiet_failed_reads(path):
                restored = self._manager.restore(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; the user needs the path and the cause
            earlier = [s for s in self._manager.all_steps() if s < epoch]
            advice = (f"delete {path} to resume from epoch {max(earlier)}" if earlier else
                      f"delete {self.directory} to start the run again")
            raise CheckpointError(f"cannot restore checkpoint {path}: {_first_line(e)}; {advice}") from None
        return state.replace(**restored.state), restored.meta

    def close(self):
        self._manager.close()


def save_variables(path, variables, meta):
    """Writes a model's `variables` (params, BatchNorm statistics) and a JSON-able `meta` dict (say,
    the model's name and classes) to the folder `path`: weights to share or fine-tune from, without
    the optimizer state. What `path` held is replaced only once the new folder is complete (orbax
    writes it as `path.new`, then two renames swap it in; a kill between them leaves `path.new`,
    which `load_variables(path)` reads)."""
    path = pathlib.Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file: pass a folder to save the weights in")
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers("variables"))) as checkpointer:
        checkpointer.save(new, force=True, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(dict(variables)), meta=ocp.args.JsonSave(meta)))
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_variables(path, like=None):
    """Reads `(variables, meta)` from the folder `save_variables` wrote, or the params and BatchNorm
    statistics alone from a `Checkpoints` folder's last epoch, or from one epoch's folder (`meta`
    then holds that epoch's JSON dict). Arrays come back as NumPy arrays.

    Args:
      path: the folder.
      like: optional variables to check the saved ones against (e.g. `jax.eval_shape` of `model.init`):
        a mismatch raises CheckpointError listing each leaf that does not fit.
    Raises:
      CheckpointError: `path` holds neither, cannot be read, or does not fit `like`.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists() and path.with_name(path.name + ".new").is_dir():  # killed in save_variables' swap
        path = path.with_name(path.name + ".new")
    epochs = [int(p.parent.name) for p in path.glob("*/state") if p.parent.name.isdigit()] if path.is_dir() else []
    if epochs:  # a `Checkpoints` folder: its last epoch
        return load_variables(path / str(max(epochs)), like)
    item = next((name for name in ("variables", "state") if (path / name).is_dir()), None)
    runs = sorted({p.parent.parent.name for p in path.glob("*/*/state") if p.parent.name.isdigit()}
                  if path.is_dir() and item is None else [])
    if runs:  # experiments.cifar's <workdir>/checkpoints, one Checkpoints folder a run
        raise CheckpointError(f"{path} holds runs' checkpoint folders ({', '.join(runs)}): pass one of them, "
                              f"e.g. {path / runs[0]}")
    if item is None:
        raise CheckpointError(f"{path} is not an fnlearn checkpoint: expected a folder written by save_variables, "
                              f"a Checkpoints folder (experiments.cifar's <workdir>/checkpoints/run0) or one "
                              f"epoch's folder in it")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    # Orbax warns that an item folder has no _CHECKPOINT_METADATA of its own: it never has one (the
    # step folder does), and reading it as a plain tree is what is meant here.
    absl_logger.setLevel(logging.ERROR)
    try:
        # A training state's item holds the optimizer state too: read params and statistics alone.
        with ocp.PyTreeCheckpointer() as checkpointer:
            saved = checkpointer.metadata(path / item).item_metadata
            if saved is None:
                raise CheckpointError(f"cannot read checkpoint {path}: its arrays' metadata is missing or damaged")
            saved = saved.tree
            saved = {k: saved[k] for k in ("params", "batch_stats") if saved.get(k) is not None}
            if like is not None:
                _check_fits(saved, like, path)
            with _quiet_failed_reads(path):
                variables = checkpointer.restore(path / item, args=ocp.args.PyTreeRestore(
                    item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved), partial_restore=True,
                    restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(meta=ocp.JsonCheckpointHandler())) as checkpointer:
            meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    finally:
        absl_logger.setLevel(level)
    return variables, meta
