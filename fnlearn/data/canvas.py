"""A detection set made from classification images: objects pasted onto larger canvases.

Each canvas is another image of the set, scaled up to fill it, with 1 to `max_objects`
images pasted on top at random scales and places; where an object lies is known exactly,
so the boxes are exact. Each later object may cover an earlier one by at most `max_overlap`
of the smaller box. Canvas i depends only on (seed, i), so any slice of a set can be made alone.
"""
import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Canvases:
    """A detection set in memory.

    Attributes:
      images: (N, S, S, C) uint8.
      boxes: (N, K, 4) float32 (x1, y1, x2, y2) in pixels, zeros past `counts`.
      classes: (N, K) int32, -1 past `counts`.
      counts: (N,) int32, the objects on each canvas (1..K).
      sources: (N, K) int32, the pasted images' indices in the source set, -1 past `counts`.
    """
    images: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    sources: np.ndarray


def _covered(box, other):
    """How much of the smaller of two (x1, y1, x2, y2) boxes the other overlaps, as a fraction."""
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    return max(w, 0) * max(h, 0) / smaller


def resized(image, side):
    """A (H, W, C) uint8 image resized to (side, side), bilinear (what a canvas holds)."""
    squeeze = image.shape[-1] == 1
    out = np.array(Image.fromarray(image[..., 0] if squeeze else image).resize((side, side), Image.BILINEAR))
    return out[..., None] if squeeze else out


def make_canvases(images, labels, count, seed, *, first=0, size=128, max_objects=4, scale=(0.75, 2.0),
                  max_overlap=0.2, tries=20):
    """Canvases `first` to `first + count - 1` of `size`x`size`, from the (N, H, W, C) uint8 `images`
    and their `labels`.

    Args:
      images, labels: the source set (square images).
      count: how many canvases.
      seed: canvas i comes from `np.random.default_rng((seed, i))`.
      first: the first canvas's index i.
      size: the canvases' side in pixels.
      max_objects: each canvas holds 1 to this many objects, uniformly.
      scale: an object's side is its image's times a factor drawn uniformly from this range.
      max_overlap: no two objects overlap by more than this fraction of the smaller one.
      tries: placements tried per object before the canvas makes do with fewer objects.
    Returns:
      `Canvases`.
    """
    n, side = len(images), images.shape[1]
    out = Canvases(np.empty((count, size, size, images.shape[-1]), np.uint8),
                   np.zeros((count, max_objects, 4), np.float32), np.full((count, max_objects), -1, np.int32),
                   np.zeros(count, np.int32), np.full((count, max_objects), -1, np.int32))
    for i in range(count):
        rng = np.random.default_rng((seed, first + i))
        picks = rng.choice(n, 1 + max_objects, replace=False)  # the background, then the objects
        canvas = resized(images[picks[0]], size)
        placed = []
        for source in picks[1:1 + rng.integers(1, max_objects + 1)]:
            length = int(round(side * rng.uniform(*scale)))
            for _ in range(tries):
                x, y = rng.integers(0, size - length + 1, 2)
                box = (int(x), int(y), int(x) + length, int(y) + length)
                if all(_covered(box, other) <= max_overlap for other, _ in placed):
                    canvas[box[1]:box[3], box[0]:box[2]] = resized(images[source], length)
                    placed.append((box, source))
                    break
        out.images[i] = canvas
        out.counts[i] = len(placed)
        for k, (box, source) in enumerate(placed):
            out.boxes[i, k], out.classes[i, k], out.sources[i, k] = box, labels[source], source
    return out
