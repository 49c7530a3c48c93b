"""The progress bar moves as steps finish, not as they are dispatched."""
from fnlearn.train.progress import StepProgress


class Marker:
    """Stands for a step's output: ready only after `looks` calls of `is_ready`."""

    def __init__(self, looks=0):
        self.looks = looks

    def is_ready(self):
        self.looks -= 1
        return self.looks < 0


def test_the_bar_counts_finished_steps_keeping_one_call_in_flight():
    slow = Marker(looks=3)
    with StepProgress(3, "test", examples_per_step=8, disable=True) as bar:
        bar.dispatched(1, slow)
        assert bar.finished == 0  # the first call may still run while the next is dispatched
        bar.dispatched(1, Marker())
        assert bar.finished == 1 and slow.looks < 0  # waited for the first call to finish
        bar.dispatched(1, Marker())
        assert bar.finished == 2
    assert bar.finished == 3  # leaving the block waits for the rest


def test_an_interrupted_bar_keeps_what_finished():
    try:
        with StepProgress(3, "test", disable=True) as bar:
            bar.dispatched(1, Marker())
            bar.dispatched(1, Marker(looks=10**9))  # never finishes: must not be waited for
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert bar.finished == 1  # the first call, found finished when the second was dispatched
