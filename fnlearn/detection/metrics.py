"""Detection scores the way COCO computes them: AP at IoU 0.5 and averaged over 0.5:0.95.

The rules follow pycocotools' `COCOeval` (bbox, every area, no crowd boxes): per image and
class at most `max_detections` detections by score; each detection, highest score first,
takes the unmatched ground-truth box of its class it overlaps most, if that IoU is at least
the threshold; precision is made non-increasing in recall and read at the 101 recalls
0, 0.01, ..., 1 (0 beyond the highest recall reached); AP is their mean. A class with no
ground truth is left out of the mean.
"""
import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALLS = np.linspace(0.0, 1.0, 101)


def _areas(boxes):
    return np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), -1)


def _iou(a, b):
    """(N, 4) x (M, 4) xyxy -> (N, M), in float64."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), -1)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return inter / np.where(union > 0, union, 1)


def _match(det_boxes, gt_boxes, thresholds):
    """(T, N) bool: whether each detection (in score order) matches a ground-truth box at each threshold."""
    matched = np.zeros((len(thresholds), len(det_boxes)), bool)
    if not len(gt_boxes) or not len(det_boxes):
        return matched
    ious = _iou(det_boxes, gt_boxes)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(gt_boxes), bool)
        for d in range(len(det_boxes)):
            candidates = np.where(taken, -1.0, ious[d])
            # The best unmatched box; of equals, the last (COCOeval replaces its choice on a tie).
            g = len(candidates) - 1 - int(np.argmax(candidates[::-1]))
            if candidates[g] >= min(threshold, 1 - 1e-10):
                taken[g], matched[t, d] = True, True
    return matched


def average_precision(detections, ground_truths, num_classes, thresholds=IOU_THRESHOLDS, max_detections=100):
    """COCO's AP per IoU threshold and class.

    Args:
      detections: per image, `(boxes (N, 4) xyxy, scores (N,), classes (N,))`.
      ground_truths: per image, `(boxes (M, 4) xyxy, classes (M,))`.
      num_classes: the classes' count.
      thresholds: the IoU thresholds.
      max_detections: per image and class, the highest-scoring this many count.
    Returns:
      (len(thresholds), num_classes) APs; NaN for a class without ground truth.
    """
    ap = np.full((len(thresholds), num_classes), np.nan)
    for c in range(num_classes):
        scores, matched, n_truth = [], [], 0
        for (boxes, det_scores, det_classes), (gt_boxes, gt_classes) in zip(detections, ground_truths, strict=True):
            truth = np.asarray(gt_boxes, np.float64)[np.asarray(gt_classes) == c]
            mine = np.asarray(det_classes) == c
            order = np.argsort(-np.asarray(det_scores)[mine], kind="stable")[:max_detections]
            boxes = np.asarray(boxes, np.float64)[mine][order]
            scores.append(np.asarray(det_scores)[mine][order])
            matched.append(_match(boxes, truth, thresholds))
            n_truth += len(truth)
        if n_truth == 0:
            continue
        scores = np.concatenate(scores)
        order = np.argsort(-scores, kind="stable")
        true_positives = np.concatenate(matched, axis=1)[:, order]
        for t, tp in enumerate(true_positives):
            tp_sum, fp_sum = np.cumsum(tp), np.cumsum(~tp)
            recall = tp_sum / n_truth
            precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
            precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or more
            at = np.searchsorted(recall, RECALLS, side="left")
            ap[t, c] = np.mean(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
                               if len(precision) else np.zeros(len(RECALLS)))
    return ap


def mean_average_precision(detections, ground_truths, num_classes, max_detections=100):
    """`{"map50": AP at IoU 0.5, "map50_95": AP over IoU 0.5:0.95}`, each a mean over the classes
    that have ground truth (COCO's AP50 and AP)."""
    ap = average_precision(detections, ground_truths, num_classes, IOU_THRESHOLDS, max_detections)
    if np.isnan(ap).all():
        raise ValueError("no ground-truth boxes: mAP is undefined")
    return {"map50": float(np.nanmean(ap[0])), "map50_95": float(np.nanmean(ap))}
