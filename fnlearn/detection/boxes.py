"""Boxes: IoU and its generalisations, and the YOLO box parameterisation on a grid.

Boxes are (x1, y1, x2, y2) in pixels, the corners' order the field's (torchvision's
`box_iou`, pycocotools after its xywh conversion). Functions take any leading batch
dimensions and work under `jit` and `vmap`.
"""
import math

import jax
import jax.numpy as jnp

_EPS = 1e-9


def area(boxes):
    """(..., 4) -> (...): width times height, 0 for an empty box."""
    return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def pairwise_iou(a, b):
    """IoU of every box of `a` (..., N, 4) with every box of `b` (..., M, 4): (..., N, M)."""
    top_left = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = jnp.prod(jnp.clip(bottom_right - top_left, 0), axis=-1)
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    return inter / jnp.maximum(union, _EPS)


def _iou_and_hull(a, b):
    """Elementwise IoU of aligned boxes, their union, and the smallest box enclosing both."""
    inter = jnp.prod(jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0), -1)
    union = area(a) + area(b) - inter
    hull = jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:])], -1)
    return inter / jnp.maximum(union, _EPS), union, hull


def giou(a, b):
    """Generalised IoU of aligned boxes (..., 4): IoU - (hull - union) / hull, in (-1, 1]
    (Rezatofighi et al., 2019); unlike IoU it still has a gradient when the boxes do not touch."""
    iou, union, hull = _iou_and_hull(a, b)
    hull_area = area(hull)
    return iou - (hull_area - union) / jnp.maximum(hull_area, _EPS)


def ciou(a, b):
    """Complete IoU of aligned boxes (..., 4): IoU less the centres' squared distance over the
    hull's squared diagonal, less an aspect-ratio term (Zheng et al., 2020; YOLOv5's box loss)."""
    iou, _, hull = _iou_and_hull(a, b)
    distance = jnp.sum((_centre(a) - _centre(b)) ** 2, -1)
    diagonal = jnp.sum((hull[..., 2:] - hull[..., :2]) ** 2, -1)
    v = (4 / math.pi**2) * (_aspect(a) - _aspect(b)) ** 2
    alpha = jax.lax.stop_gradient(v / jnp.maximum(1 - iou + v, _EPS))  # a weight, as the paper's
    return iou - distance / jnp.maximum(diagonal, _EPS) - alpha * v


def _centre(boxes):
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def _aspect(boxes):
    return jnp.arctan((boxes[..., 2] - boxes[..., 0]) / jnp.maximum(boxes[..., 3] - boxes[..., 1], _EPS))


def grid_centres(height, width, stride):
    """(height·width, 2) pixel centres (x, y) of a stride's grid cells, row by row."""
    ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    return (jnp.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * stride


def decode(t, centres, stride, anchor):
    """Boxes (..., 4) from raw predictions `t` (..., 4) at cells with pixel `centres` (..., 2).

    YOLOv5's parameterisation, with one square anchor per scale: the centre is the cell's
    centre plus (2σ(t) - 1)·stride, within a stride of it (-0.5 to 1.5 cells from the cell's
    corner, so a neighbouring cell can predict a box whose centre is next door); the side is
    anchor·(2σ(t))², 0 to 4x the anchor.
    Bounded both ways, unlike exp(t), so an early wild prediction cannot overflow.
    """
    centre = centres + (2 * jax.nn.sigmoid(t[..., :2]) - 1) * stride
    size = anchor * (2 * jax.nn.sigmoid(t[..., 2:])) ** 2
    return jnp.concatenate([centre - size / 2, centre + size / 2], -1)


def encode(boxes, centres, stride, anchor):
    """The raw `t` that `decode` turns into `boxes` (its inverse), for centres within 1 stride of
    the cell's centre and sides below 4x the anchor."""
    size = boxes[..., 2:] - boxes[..., :2]
    return jax.scipy.special.logit(jnp.concatenate([((_centre(boxes) - centres) / stride + 1) / 2,
                                                    jnp.sqrt(size / anchor) / 2], -1))
