"""YOLOv5's training targets and loss, for a detector with one anchor per scale.

Target assignment (YOLOv5's `build_targets`): on every scale whose anchor is within 4x of the
box's sides, the cell holding the box's centre and its two nearest neighbours (one across,
one down or up) predict the box; a cell claimed by two boxes takes the smaller (FCOS's rule).
Three terms, as YOLOv5's `ComputeLoss`: 1 - CIoU between each positive cell's decoded box and
its target; objectness BCE over every cell, the target being the positive cell's (detached,
clipped) IoU and 0 elsewhere, weighted per scale (YOLOv5's balance: finer scales more); and
the class cross-entropy of the positive cells.
"""
import jax
import jax.numpy as jnp
import optax

from fnlearn.detection.boxes import ciou, decode, grid_centres

# (box, objectness, class) weights and the per-scale objectness balance (strides 8, 16).
WEIGHTS = (1.0, 1.0, 1.0)
BALANCE = (4.0, 1.0)


def assign(boxes, classes, height, width, stride, anchor, anchor_ratio=4.0):
    """Which box each cell of one scale predicts, for one image.

    Args:
      boxes: (K, 4) xyxy pixel boxes; classes: (K,) with -1 marking padding.
      height, width: the scale's grid; stride, anchor: its cell size and anchor side (pixels).
      anchor_ratio: a box goes to this scale only if both its sides are within this factor of the anchor.
    Returns:
      (height·width,) int32: the index into `boxes` each cell predicts, -1 for background.
    """
    cell = jnp.floor(grid_centres(height, width, stride) / stride)  # (HW, 2): each cell's (column, row)
    centre = (boxes[:, :2] + boxes[:, 2:]) / (2 * stride)  # (K, 2) in cells
    home, frac = jnp.floor(centre), centre % 1
    # The centre's cell, and along each axis the neighbour on the side the centre leans to (none
    # when it sits mid-cell), as YOLOv5's `build_targets` with its offset 0.5.
    dx, dy = jnp.moveaxis((cell[:, None, :] - home[None]).astype(jnp.int32), -1, 0)  # (HW, K) each
    tx, ty = jnp.moveaxis(jnp.where(frac < 0.5, -1, jnp.where(frac > 0.5, 1, 0)), -1, 0)  # (K,) each
    near = ((dx == 0) & (dy == 0)) | ((dy == 0) & (tx != 0) & (dx == tx)) | ((dx == 0) & (ty != 0) & (dy == ty))
    sides = jnp.maximum(boxes[:, 2:] - boxes[:, :2], 1e-6)
    fits = jnp.max(jnp.maximum(sides / anchor, anchor / sides), -1) < anchor_ratio
    match = near & (fits & (classes >= 0))[None, :]
    smallest = jnp.argmin(jnp.where(match, jnp.prod(sides, -1)[None, :], jnp.inf), axis=1)
    return jnp.where(match.any(1), smallest, -1).astype(jnp.int32)


def yolo_loss(outputs, targets, strides, anchors, weights=WEIGHTS, balance=BALANCE):
    """`(loss, {"box", "obj", "cls"})` of a batch.

    Args:
      outputs: per scale, (B, H, W, 5 + C) raw maps (`models.YOLO`).
      targets: `(boxes (B, K, 4) xyxy pixels, classes (B, K))`, classes -1 for padding.
      strides, anchors: per scale, as the model's `STRIDES` and `ANCHORS`.
      weights: the (box, objectness, class) terms' weights in the loss.
      balance: per scale, its objectness term's weight.
    Returns:
      the weighted sum, and the three terms: box and class terms are means over the positive
      cells, objectness the balanced sum of per-scale means over all cells.
    """
    boxes, classes = targets
    box_sum = cls_sum = obj = 0.0
    positives = 0
    for out, stride, anchor, gain in zip(outputs, strides, anchors, balance, strict=True):
        b, h, w, _ = out.shape
        out = out.reshape(b, h * w, -1)
        index = jax.vmap(lambda bx, c: assign(bx, c, h, w, stride, anchor))(boxes, classes)  # (B, HW)
        positive = index >= 0
        safe = jnp.maximum(index, 0)
        target_box = jnp.take_along_axis(boxes, safe[..., None], axis=1)  # (B, HW, 4)
        target_class = jnp.take_along_axis(classes, safe, axis=1)
        overlap = ciou(decode(out[..., :4], grid_centres(h, w, stride), stride, anchor), target_box)
        box_sum += jnp.sum(jnp.where(positive, 1 - overlap, 0.0))
        objectness = jnp.where(positive, jax.lax.stop_gradient(jnp.clip(overlap, 0, 1)), 0.0)
        obj += gain * jnp.mean(optax.sigmoid_binary_cross_entropy(out[..., 4], objectness))
        cls_sum += jnp.sum(jnp.where(positive, optax.softmax_cross_entropy_with_integer_labels(
            out[..., 5:], jnp.maximum(target_class, 0)), 0.0))
        positives += jnp.sum(positive)
    count = jnp.maximum(positives, 1)
    terms = {"box": box_sum / count, "obj": obj, "cls": cls_sum / count}
    return weights[0] * terms["box"] + weights[1] * terms["obj"] + weights[2] * terms["cls"], terms
