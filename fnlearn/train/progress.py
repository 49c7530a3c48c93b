"""A progress bar that shows steps that have finished, not steps that were dispatched."""
import collections
import time

from tqdm.auto import tqdm


class StepProgress:
    """A tqdm bar over training steps that advances as the device finishes them.

    JAX dispatches a jitted call and returns at once, so a bar moved at dispatch fills
    instantly. This one keeps `lag` calls in flight (the device never waits for the
    host) and moves when the oldest is done. It waits by polling `is_ready()`, so
    Ctrl-C interrupts at once rather than after the call it waits on.

        with StepProgress(steps, "epoch 1/10", batch_size) as bar:
            for batch in batches:
                state, metrics = train_fn(state, batch)
                bar.dispatched(1, metrics["loss"])
    """

    def __init__(self, total, desc, examples_per_step=1, *, unit="img", lag=1, disable=False, poll_seconds=0.02):
        self._bar = tqdm(total=total * examples_per_step, desc=desc, unit=unit, unit_scale=True, leave=True,
                         disable=disable, dynamic_ncols=True)
        self._per_step = examples_per_step
        self.finished = 0  # steps the device has finished
        self._pending = collections.deque()
        self._lag, self._poll = lag, poll_seconds

    def dispatched(self, steps, marker):
        """Records `steps` steps just dispatched; `marker` is a small array they produce."""
        self._pending.append((steps, marker))
        while len(self._pending) > self._lag:
            self._finish_oldest()

    def write(self, line, log=print):
        """Calls `log(line)` with the bar cleared first and redrawn after, so the two never mix."""
        with tqdm.external_write_mode():
            log(line)

    def _finish_oldest(self):
        steps, marker = self._pending.popleft()
        delay = 1e-4  # short steps are done at the first look or soon after; long ones get polled less often
        while not marker.is_ready():
            time.sleep(delay)
            delay = min(2 * delay, self._poll)
        self.finished += steps
        self._bar.update(steps * self._per_step)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:  # on an error or Ctrl-C, leave the bar where the device got to
            while self._pending:
                self._finish_oldest()
        self._bar.close()
