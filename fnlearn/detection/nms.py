"""Class-aware non-maximum suppression with fixed shapes, so it runs under `jit` and `vmap`.

torchvision's `batched_nms` returns as many boxes as survive; a compiled program needs one
output shape, so `nms` returns `max_boxes` slots and a mask of the filled ones (TensorFlow's
`combined_non_max_suppression` does the same).
"""
import jax
import jax.numpy as jnp

from fnlearn.detection.boxes import pairwise_iou


def nms(boxes, scores, classes, *, iou_threshold=0.5, score_threshold=0.0, max_boxes=100):
    """Greedy NMS within each class, highest score first.

    Args:
      boxes: (N, 4) xyxy candidates (take the top few hundred by score first: the cost is N²).
      scores: (N,) their confidences.
      classes: (N,) their integer classes; a box suppresses only boxes of its own class.
      iou_threshold: a box whose IoU with a kept, higher-scoring box of its class exceeds this
        is dropped.
      score_threshold: candidates scoring at or below this are dropped first.
      max_boxes: the output's slots.
    Returns:
      `(boxes (max_boxes, 4), scores, classes, valid)`, kept boxes by falling score; slots past
      the last kept box have `valid` False, score 0 and class -1.
    """
    n = boxes.shape[0]
    if n == 0:  # no candidates: every slot is padding
        return (jnp.zeros((max_boxes, 4), boxes.dtype), jnp.zeros(max_boxes, scores.dtype),
                jnp.full(max_boxes, -1, classes.dtype), jnp.zeros(max_boxes, bool))
    order = jnp.argsort(-scores)
    boxes, scores, classes = boxes[order], scores[order], classes[order]
    overlaps = (pairwise_iou(boxes, boxes) > iou_threshold) & (classes[:, None] == classes[None, :])
    later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]

    def visit(i, keep):  # box i, if still kept, drops the later boxes it overlaps
        return keep & ~(overlaps[i] & later[i] & keep[i])

    keep = jax.lax.fori_loop(0, n, visit, scores > score_threshold)
    # The kept boxes first, in score order (a stable sort of the flags), then padding.
    slots = jnp.argsort(~keep, stable=True)[:max_boxes]
    if n < max_boxes:
        slots = jnp.concatenate([slots, jnp.full(max_boxes - n, n - 1)])
    valid = keep[slots] & (jnp.arange(max_boxes) < n)
    return (jnp.where(valid[:, None], boxes[slots], 0.0), jnp.where(valid, scores[slots], 0.0),
            jnp.where(valid, classes[slots], -1), valid)
