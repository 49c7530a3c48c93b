"""What a run shows a person: curves, a confusion matrix, TensorBoard scalars."""
import os
import pathlib
import struct
import time
import uuid

import numpy as np
# The object API draws to files without pyplot's global state or a display backend.
from matplotlib.figure import Figure


def confusion_matrix(labels, predictions, num_classes):
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


class TensorBoardWriter:
    """TensorBoard events: `writer(epoch, record)` (an `on_epoch` callback) writes each value of
    `record` as a scalar; `scalars` and `histogram` write at any step.

    Written synchronously and flushed at once, so a killed run leaves the history it had
    (`tensorboardX.SummaryWriter` queues events for a thread that flushes every 2 minutes).
    """

    def __init__(self, folder):
        from tensorboardX.event_file_writer import EventsWriter  # imported on use: it pulls in protobuf

        os.makedirs(folder, exist_ok=True)
        # The suffix keeps two writers started in one second (a run and its resume) apart.
        self._writer = EventsWriter(os.path.join(folder, "events"), filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def __call__(self, epoch, record):
        self.scalars(epoch, record)
        self.flush()

    def scalars(self, step, record):
        """Each `name: value` of `record` as a scalar at `step`."""
        from tensorboardX.summary import scalar

        for name, value in record.items():
            self._write(step, scalar(name, float(value)))

    def histogram(self, step, name, stats):
        """A histogram from `fnlearn.tools.tensorboard.histogram_stats`' figures for one tensor (host values)."""
        from tensorboardX.summary import histogram_raw

        counts = np.asarray(stats["counts"])
        low, high = float(stats["min"]), float(stats["max"])
        limits = np.linspace(low, high, len(counts) + 1)[1:] if high > low else np.full(len(counts), high)
        self._write(step, histogram_raw(name, low, high, float(stats["num"]), float(stats["sum"]),
                                        float(stats["sum_squares"]), limits.tolist(), counts.tolist()))

    def _write(self, step, summary):
        from tensorboardX.proto.event_pb2 import Event

        self._writer.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def read_events(folder):
    """`[(step, tag, value)]` from the TensorBoard event files in `folder`, in the order written: a
    scalar's value is a float, a histogram's its `HistogramProto` (`min`, `max`, `num`, `sum`,
    `sum_squares`, `bucket_limit`, `bucket`). Reads the TFRecord framing (length, its CRC, the
    event, its CRC) itself: no TensorFlow needed. A last record cut short is left out."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*"), key=os.path.getmtime):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + length + 4 > len(data):  # a record cut short by a killed writer
                break
            event = Event.FromString(data[i + 12:i + 12 + length])
            found += [(event.step, v.tag, v.histo if v.HasField("histo") else v.simple_value)
                      for v in event.summary.value]
            i += 12 + length + 4
    return found


def plot_curves(history, path):
    """Loss and accuracy per epoch: train and, where present, test."""
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, history["train_loss"], marker="o", label="train")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, history["train_accuracy"], marker="o", label="train")
    if history.get("eval_accuracy"):
        ax_acc.plot(epochs, history["eval_accuracy"], marker="o", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion(matrix, class_names, path):
    """The confusion matrix as a heat map with counts, rows normalised for the colours."""
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig = Figure(figsize=(1 + 0.7 * n, 1 + 0.6 * n))
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
