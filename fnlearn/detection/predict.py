"""From a detector's raw maps to boxes: decode every cell, score it, keep the best, suppress overlaps."""
from functools import partial

import jax
import jax.numpy as jnp

from fnlearn.detection.boxes import decode, grid_centres
from fnlearn.detection.nms import nms


def decode_outputs(outputs, strides, anchors):
    """`(boxes (B, N, 4), scores (B, N), classes (B, N))` of every cell of every scale: the box
    clipped to the image, the score objectness times the best class's probability (YOLOv5's)."""
    boxes, probs = [], []
    for out, stride, anchor in zip(outputs, strides, anchors, strict=True):
        b, h, w, _ = out.shape
        out = out.reshape(b, h * w, -1)
        box = decode(out[..., :4], grid_centres(h, w, stride), stride, anchor)
        boxes.append(jnp.clip(box, 0, jnp.array([w, h, w, h]) * stride))
        probs.append(jax.nn.sigmoid(out[..., 4:5]) * jax.nn.softmax(out[..., 5:], -1))
    probs = jnp.concatenate(probs, 1)
    return jnp.concatenate(boxes, 1), jnp.max(probs, -1), jnp.argmax(probs, -1).astype(jnp.int32)


def detect(outputs, strides, anchors, *, score_threshold=0.001, iou_threshold=0.6, max_boxes=100, candidates=300):
    """Detections per image, `(boxes (B, max_boxes, 4), scores, classes, valid)` (see `nms`).

    The `candidates` best-scoring cells go through class-aware NMS. The defaults are for
    scoring mAP (YOLOv5's val.py: threshold 0.001, IoU 0.6); to show boxes, raise the threshold.
    """
    boxes, scores, classes = decode_outputs(outputs, strides, anchors)
    scores, top = jax.lax.top_k(scores, min(candidates, scores.shape[1]))
    boxes = jnp.take_along_axis(boxes, top[..., None], 1)
    classes = jnp.take_along_axis(classes, top, 1)
    suppress = partial(nms, iou_threshold=iou_threshold, score_threshold=score_threshold, max_boxes=max_boxes)
    return jax.vmap(suppress)(boxes, scores, classes)
