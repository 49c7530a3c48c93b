"""Detection: boxes, NMS and COCO's mAP, each against hand-worked cases or a plain reference."""
import json
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import detection as detection_experiment
from fnlearn import models
from fnlearn.data import DataError, augment, load_canvases, load_dataset
from fnlearn.data.canvas import make_canvases, resized
from fnlearn.detection.boxes import ciou, decode, encode, giou, grid_centres, pairwise_iou
from fnlearn.detection.loss import assign, yolo_loss
from fnlearn.detection.metrics import average_precision, mean_average_precision
from fnlearn.detection.nms import nms
from fnlearn.detection.predict import detect
from fnlearn.models.yolo import YOLO


def test_iou_giou_and_ciou_by_hand():
    a, b = jnp.array([0.0, 0, 2, 2]), jnp.array([1.0, 1, 3, 3])
    # Overlap 1, union 4 + 4 - 1 = 7; the hull (0,0)-(3,3) has area 9, its diagonal² 18;
    # the centres (1,1) and (2,2) are 2 apart squared; equal aspects.
    assert float(pairwise_iou(a[None], b[None])[0, 0]) == pytest.approx(1 / 7)
    assert float(giou(a, b)) == pytest.approx(1 / 7 - (9 - 7) / 9)
    assert float(ciou(a, b)) == pytest.approx(1 / 7 - 2 / 18)
    # A 2x1 and a 1x2 box at the origin: IoU 1/3, centres 0.5 apart squared, hull diagonal² 8.
    wide, tall = jnp.array([0.0, 0, 2, 1]), jnp.array([0.0, 0, 1, 2])
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(0.5)) ** 2
    assert float(ciou(wide, tall)) == pytest.approx(1 / 3 - 0.5 / 8 - v / (1 - 1 / 3 + v) * v)
    # Apart: IoU 0, GIoU negative (the gap counts), both 1 for a box with itself.
    far = jnp.array([10.0, 10, 12, 12])
    assert float(pairwise_iou(a[None], far[None])[0, 0]) == 0 and float(giou(a, far)) < -0.8
    assert float(giou(a, a)) == pytest.approx(1) and float(ciou(a, a)) == pytest.approx(1)


def test_decode_inverts_encode_on_a_grid():
    stride, anchor = 8, 32.0
    centres = grid_centres(16, 16, stride)  # (256, 2): a 128x128 image
    assert centres[17].tolist() == [12.0, 12.0]  # row 1, column 1
    key1, key2 = jax.random.split(jax.random.key(0))
    offset = jax.random.uniform(key1, centres.shape, minval=-0.99, maxval=0.99) * stride
    size = jax.random.uniform(key2, centres.shape, minval=8, maxval=120)
    boxes = jnp.concatenate([centres + offset - size / 2, centres + offset + size / 2], -1)
    np.testing.assert_allclose(decode(encode(boxes, centres, stride, anchor), centres, stride, anchor), boxes,
                               atol=1e-3)


def _reference_nms(boxes, scores, classes, iou_threshold, score_threshold):
    """Plain greedy NMS per class: the indices kept, by falling score."""
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= score_threshold:
            continue
        if all(classes[j] != classes[i] or _iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


@pytest.mark.parametrize("seed", range(4))
def test_nms_keeps_what_plain_greedy_nms_keeps(seed):
    rng = np.random.default_rng(seed)
    n, batch = 60, 3
    corners = rng.uniform(0, 100, (batch, n, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(5, 40, (batch, n, 2)).astype(np.float32)], -1)
    scores = rng.uniform(0, 1, (batch, n)).astype(np.float32)
    classes = rng.integers(0, 3, (batch, n)).astype(np.int32)
    run = jax.jit(jax.vmap(lambda b, s, c: nms(b, s, c, iou_threshold=0.4, score_threshold=0.2, max_boxes=50)))
    out_boxes, out_scores, out_classes, valid = map(np.asarray, run(boxes, scores, classes))
    for i in range(batch):
        kept = _reference_nms(boxes[i], scores[i], classes[i], 0.4, 0.2)[:50]
        assert valid[i].sum() == len(kept) and not valid[i][len(kept):].any()
        np.testing.assert_array_equal(out_boxes[i][:len(kept)], boxes[i][kept])
        np.testing.assert_array_equal(out_scores[i][:len(kept)], scores[i][kept])
        np.testing.assert_array_equal(out_classes[i][:len(kept)], classes[i][kept])
        assert (out_classes[i][len(kept):] == -1).all() and (out_scores[i][len(kept):] == 0).all()


def test_nms_suppresses_only_within_a_class_and_pads_past_its_input():
    boxes = jnp.array([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    out_boxes, scores, classes, valid = nms(boxes, jnp.array([0.9, 0.8, 0.7]), jnp.array([0, 0, 1]),
                                            iou_threshold=0.5, max_boxes=5)
    assert valid.tolist() == [True, True, False, False, False]  # the second class-0 box is dropped
    assert classes.tolist() == [0, 1, -1, -1, -1] and scores.tolist() == pytest.approx([0.9, 0.7, 0, 0, 0])
    out_boxes, scores, classes, valid = jax.jit(nms)(jnp.zeros((0, 4)), jnp.zeros(0), jnp.zeros(0, int))
    assert out_boxes.shape == (100, 4) and not valid.any() and (classes == -1).all()  # no candidates: all padding


def _perfect(truth):
    return [(boxes, np.ones(len(boxes)), classes) for boxes, classes in truth]


TRUTH = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([0, 1])),
         (np.array([[5, 5, 25, 25]]), np.array([0]))]


def test_perfect_detections_score_1():
    assert mean_average_precision(_perfect(TRUTH), TRUTH, num_classes=3) == {"map50": 1.0, "map50_95": 1.0}


def test_a_known_mix_of_hits_false_positives_and_misses_by_hand():
    # Class 0, two boxes in two images. By falling score: a hit (0.9), a false positive (0.8: it
    # covers nothing), a hit (0.7). Recall 1/2, 1/2, 1; precision 1, 1/2, 2/3, made non-increasing
    # 1, 2/3, 2/3. Recalls 0 .. 0.50 (51 points) read 1; 0.51 .. 1 (50 points) read 2/3.
    detections = [(np.array([[0, 0, 10, 10], [60, 60, 70, 70]]), np.array([0.9, 0.8]), np.array([0, 0])),
                  (np.array([[5, 5, 25, 25]]), np.array([0.7]), np.array([0]))]
    truth = [(np.array([[0, 0, 10, 10]]), np.array([0])), (np.array([[5, 5, 25, 25]]), np.array([0]))]
    ap = average_precision(detections, truth, num_classes=2)
    assert ap[0, 0] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert np.isnan(ap[:, 1]).all()  # class 1 has no ground truth: left out
    # Drop the last hit: recall stops at 1/2, so the 50 recalls above it read 0.
    ap = average_precision([detections[0], (np.zeros((0, 4)), np.zeros(0), np.zeros(0))], truth, num_classes=2)
    assert ap[0, 0] == pytest.approx(51 / 101)


def test_ap_over_iou_thresholds_counts_a_loose_box_at_the_low_ones_only():
    # IoU of (0,0,10,10) with (0,0,10,13): 100/130 = 0.769, a hit at 0.50 .. 0.75 (6 of 10 thresholds).
    truth = [(np.array([[0, 0, 10, 13]]), np.array([0]))]
    detections = [(np.array([[0, 0, 10, 10]]), np.array([0.5]), np.array([0]))]
    assert mean_average_precision(detections, truth, num_classes=1) == pytest.approx({"map50": 1.0, "map50_95": 0.6})


def test_each_detection_takes_the_truth_it_overlaps_most_and_only_once():
    truth = [(np.array([[0, 0, 10, 10], [2, 0, 12, 10]]), np.array([0, 0]))]
    # Both detections sit on the second box (IoU 1 and 0.90); the first, scoring higher, takes it,
    # and the second's IoU with the first box is 75/125 = 0.6: a hit at 0.5, not at 0.7.
    detections = [(np.array([[2, 0, 12, 10], [2.5, 0, 12.5, 10]]), np.array([0.9, 0.8]), np.array([0, 0]))]
    ap = average_precision(detections, truth, num_classes=1, thresholds=[0.5, 0.7])
    assert ap[0, 0] == pytest.approx(1.0) and ap[1, 0] == pytest.approx(51 / 101)


def _source_set(n=40, side=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, side, side, 3), np.uint8), np.arange(n) % 10


def test_canvases_hold_their_objects_exactly_where_the_boxes_say():
    images, labels = _source_set()
    out = make_canvases(images, labels, 30, seed=1)
    assert out.images.shape == (30, 128, 128, 3) and set(out.counts) == {1, 2, 3, 4}
    for i in range(30):
        n = out.counts[i]
        assert (out.classes[i, n:] == -1).all() and (out.boxes[i, n:] == 0).all()
        np.testing.assert_array_equal(out.classes[i, :n], labels[out.sources[i, :n]])
        for k in range(n):
            x1, y1, x2, y2 = out.boxes[i, k].astype(int)
            assert 24 <= x2 - x1 == y2 - y1 <= 64 and 0 <= x1 and x2 <= 128 and 0 <= y1 and y2 <= 128
            # Every pixel of the box that no later object covers is the resized source image.
            visible = np.ones((y2 - y1, x2 - x1), bool)
            for lx1, ly1, lx2, ly2 in out.boxes[i, k + 1:n].astype(int) - [x1, y1, x1, y1]:
                visible[max(ly1, 0):max(ly2, 0), max(lx1, 0):max(lx2, 0)] = False
            assert visible.mean() >= 1 - 0.2 * (n - 1 - k) - 1e-9  # each later box covers at most 20% of it
            expected = resized(images[out.sources[i, k]], x2 - x1)
            np.testing.assert_array_equal(out.images[i, y1:y2, x1:x2][visible], expected[visible])


def test_canvases_depend_on_the_seed_and_their_index_only():
    images, labels = _source_set()
    five, last_two = make_canvases(images, labels, 5, seed=3), make_canvases(images, labels, 2, seed=3, first=3)
    for field in ("images", "boxes", "classes", "counts", "sources"):
        np.testing.assert_array_equal(getattr(five, field)[3:], getattr(last_two, field))
    assert not np.array_equal(make_canvases(images, labels, 5, seed=4).images, five.images)


def test_each_box_goes_to_the_cell_of_its_centre_and_its_two_nearest_neighbours():
    # Centre (22, 18) at stride 8 is cell (row 2, column 2), at 0.75 across and 0.25 down it:
    # the neighbours are column 3 (right) and row 1 (up). The padding box (class -1) takes none.
    boxes = jnp.array([[6.0, 2, 38, 34], [0, 0, 0, 0]])
    index = assign(boxes, jnp.array([3, -1]), 16, 16, stride=8, anchor=32.0).reshape(16, 16)
    assert {tuple(cell) for cell in np.argwhere(np.asarray(index) == 0)} == {(2, 2), (2, 3), (1, 2)}
    assert (np.asarray(index) != 1).all()
    # A box 4x or more off the anchor's side goes to no cell of that scale.
    assert (assign(boxes, jnp.array([3, -1]), 16, 16, stride=8, anchor=200.0) == -1).all()
    # Centre (24, 20): on a grid line across (the cell right of it, its neighbour left), mid-cell down
    # (no neighbour); at stride 16, (1.5, 1.25) cells: mid-cell across, leaning up.
    on_line = jnp.array([[8.0, 4, 40, 36]])
    for stride, anchor, cells in ((8, 32.0, {(2, 3), (2, 2)}), (16, 64.0, {(1, 1), (0, 1)})):
        index = assign(on_line, jnp.array([0]), 128 // stride, 128 // stride, stride, anchor)
        assert {tuple(c) for c in np.argwhere(np.asarray(index).reshape(128 // stride, -1) == 0)} == cells
    # Two boxes claiming one cell: the smaller takes it.
    both = jnp.array([[2.0, 2, 42, 42], [12, 12, 32, 32]])  # centres (22, 22) both: cell (2, 2)
    assert int(assign(both, jnp.array([0, 1]), 16, 16, stride=8, anchor=32.0).reshape(16, 16)[2, 2]) == 1


def _outputs_for(boxes, classes, num_classes=4, size=64, obj_logit=-20.0, class_logit=20.0):
    """Raw maps (strides 8, 16) whose assigned cells decode exactly to `boxes` (1, K, 4) with confident
    objectness and class, and every other cell's objectness at `obj_logit`."""
    outputs = []
    for stride, anchor in zip(YOLO.STRIDES, YOLO.ANCHORS):
        h = size // stride
        index = assign(boxes[0], classes[0], h, h, stride, anchor)
        target = boxes[0][jnp.maximum(index, 0)]
        t = encode(target, grid_centres(h, h, stride), stride, anchor)
        positive = (index >= 0)[:, None]
        obj = jnp.where(positive, 20.0, obj_logit)
        cls = jnp.where(positive, jax.nn.one_hot(classes[0][jnp.maximum(index, 0)], num_classes) * class_logit, 0.0)
        outputs.append(jnp.concatenate([jnp.where(positive, t, 0.0), obj, cls], -1).reshape(1, h, h, -1))
    return tuple(outputs)


def test_the_loss_terms_on_hand_made_maps():
    loss_of = jax.jit(lambda outputs, targets, *_: yolo_loss(outputs, targets, YOLO.STRIDES, YOLO.ANCHORS))
    boxes, classes = jnp.array([[[6.0, 2, 38, 34], [0, 0, 0, 0]]]), jnp.array([[3, -1]])
    # Every positive cell decodes exactly to its box: box term 0; confident right class: class term ~0;
    # objectness targets the IoU, 1, where the logit says 1 - e^-20 and the rest says e^-20.
    _, terms = loss_of(_outputs_for(boxes, classes), (boxes, classes), YOLO.STRIDES, YOLO.ANCHORS)
    assert float(terms["box"]) == pytest.approx(0, abs=1e-5)
    assert float(terms["cls"]) == pytest.approx(0, abs=1e-6) and float(terms["obj"]) == pytest.approx(0, abs=1e-5)
    # Flat class logits cost ln(4) at each positive cell.
    flat = tuple(o.at[..., 5:].set(0.0) for o in _outputs_for(boxes, classes))
    assert float(loss_of(flat, (boxes, classes), YOLO.STRIDES, YOLO.ANCHORS)[1]["cls"]) == pytest.approx(math.log(4))
    # No boxes: every cell's objectness target is 0; at the 1% prior each costs -ln(0.99), weighted 4 + 1.
    empty = (jnp.zeros((1, 2, 4)), jnp.full((1, 2), -1))
    prior = tuple(jnp.zeros((1, 64 // s, 64 // s, 9)).at[..., 4].set(math.log(0.01 / 0.99)) for s in YOLO.STRIDES)
    loss, terms = loss_of(prior, empty, YOLO.STRIDES, YOLO.ANCHORS)
    assert float(terms["obj"]) == pytest.approx(5 * -math.log(0.99), rel=1e-5)
    assert float(terms["box"]) == 0 and float(terms["cls"]) == 0 and float(loss) == pytest.approx(float(terms["obj"]))
    # Boxes a little off (each cell's x logit raised by 0.5) cost 1 - CIoU at each of their cells.
    shifted = tuple(o.at[..., 0].add(0.5) for o in _outputs_for(boxes, classes))
    assert 0 < float(loss_of(shifted, (boxes, classes), YOLO.STRIDES, YOLO.ANCHORS)[1]["box"]) < 0.5


def test_detect_recovers_the_boxes_the_maps_encode():
    boxes, classes = jnp.array([[[6.0, 2, 38, 34], [30, 30, 62, 62]]]), jnp.array([[3, 1]])
    found, scores, found_classes, valid = detect(_outputs_for(boxes, classes), YOLO.STRIDES, YOLO.ANCHORS,
                                                 score_threshold=0.5, max_boxes=10)
    assert int(valid.sum()) == 2  # each box predicted by 6 cells; NMS keeps one each
    order = np.argsort(np.asarray(found_classes[0][:2]))
    np.testing.assert_allclose(np.asarray(found[0][:2])[order], np.asarray(boxes[0])[[1, 0]], atol=1e-3)
    assert sorted(np.asarray(found_classes[0][:2]).tolist()) == [1, 3] and (scores[0][:2] > 0.99).all()


def test_the_detectors_give_a_map_per_scale_at_any_multiple_of_32():
    for name, size in (("yolo_tiny", 128), ("yolo_small", 96)):
        model = models.get(name, num_classes=10)
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
        outputs = jax.eval_shape(model.apply, variables, jnp.zeros((2, size, size, 3)))
        assert [o.shape for o in outputs] == [(2, size // s, size // s, 15) for s in model.STRIDES]
    # The precision policy: bfloat16 compute, float32 params and maps.
    model = models.get("yolo_tiny", num_classes=10, dtype=jnp.bfloat16)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    outputs = jax.eval_shape(model.apply, variables, jnp.zeros((2, 64, 64, 3)))
    assert {o.dtype for o in outputs} == {jnp.dtype(jnp.float32)}
    assert set(models.names(task="detector")) == {"yolo_tiny", "yolo_small"}


def test_flip_and_zoom_move_the_boxes_with_the_pixels():
    images = np.zeros((8, 64, 64, 3), np.uint8)
    boxes = np.zeros((8, 2, 4), np.float32)
    for i in range(8):  # a white square per canvas, at different places
        x, y, side = 4 + 5 * i, 30 - 3 * i, 16 + i
        images[i, y:y + side, x:x + side] = 255
        boxes[i, 0] = (x, y, x + side, y + side)
    classes = np.tile(np.array([[0, -1]], np.int32), (8, 1))
    flipped, flipped_boxes = augment.random_flip_boxes(jax.random.key(0), images, boxes, classes)
    zoomed, zoomed_boxes, zoomed_classes = augment.random_scale_boxes(jax.random.key(1), flipped, flipped_boxes,
                                                                      classes, (0.6, 1.6))
    for image, box, c in ((flipped, flipped_boxes, classes), (zoomed, zoomed_boxes, zoomed_classes)):
        image, box = np.asarray(image, np.float32), np.asarray(box)
        assert (box[:, 1] == 0).all()  # the padding box stays empty
        for i in range(8):
            if c[i, 0] < 0:
                continue  # zoomed mostly out of the frame: dropped
            x1, y1, x2, y2 = np.round(box[i, 0]).astype(int)
            inside = image[i, y1:y2, x1:x2].sum()  # the white square is in the box, and little of it outside
            assert inside > 0.85 * 255 * 3 * (x2 - x1) * (y2 - y1) and image[i].sum() - inside < 0.2 * inside
    assert not np.array_equal(np.asarray(flipped_boxes), boxes)  # some were flipped
    assert (np.asarray(zoomed_classes)[:, 0] == 0).sum() >= 4  # and most boxes survive the zoom, checked above


@pytest.fixture(scope="module")
def tree(tmp_path_factory, write_tree):
    root = tmp_path_factory.mktemp("detection")
    return write_tree(root / "src"), root / "tfds"


def test_canvas_sets_are_prepared_once_from_each_split(tree):
    src, data_dir = tree
    dataset = load_dataset(src, data_dir=data_dir)
    train, test = load_canvases(dataset, train=40, test=12, seed=5, data_dir=data_dir)
    made = make_canvases(dataset.train_images, dataset.train_labels, 40, seed=5)
    for field in ("images", "boxes", "classes", "counts", "sources"):
        np.testing.assert_array_equal(getattr(train, field), getattr(made, field))
    np.testing.assert_array_equal(test.images, make_canvases(dataset.test_images, dataset.test_labels, 12, 6).images)
    assert sorted(p.name for p in (data_dir / "fnlearn_canvases").iterdir())  # written under the data dir
    again, _ = load_canvases(dataset, train=40, test=12, seed=5, data_dir=data_dir)  # read back
    np.testing.assert_array_equal(again.boxes, train.boxes)


def test_a_split_too_small_for_a_canvas_is_named(tree):
    src, data_dir = tree
    dataset = load_dataset(src, data_dir=data_dir)
    small = dataset._replace(test_images=dataset.test_images[:4], test_labels=dataset.test_labels[:4])
    with pytest.raises(DataError, match=f"draw 5 distinct images; the test split of {re.escape(str(src))} has 4$"):
        load_canvases(small, train=8, test=4, max_objects=4, data_dir=data_dir)


def test_the_experiment_trains_scores_and_writes_its_outputs(tree, tmp_path, capsys):
    src, data_dir = tree
    workdir = tmp_path / "run"
    flags = ["--preset", "smoke", "--data", str(src), "--data-dir", str(data_dir), "--workdir", str(workdir),
             "--train-canvases", "64", "--test-canvases", "16", "--batch-size", "16", "--epochs", "2",
             "--eval-batch-size", "8"]  # the smoke preset, smaller still
    summary = detection_experiment.main(flags)
    saved = json.loads((workdir / "summary.json").read_text())
    assert {"map50", "map50_95", "train_seconds"} <= set(saved) and saved["map50"] == summary["map50"]
    assert 0 <= saved["map50_95"] <= saved["map50"] <= 1 and saved["train_seconds"] > 0
    losses = saved["history"]["train_loss"]
    assert len(losses) == 2 and losses[-1] < losses[0]  # 8 steps lower the loss
    for name in ("detections.png", "curves.png"):
        assert (workdir / name).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "mAP50" in out and "test mAP@0.5" in out
    # A finished run resumes to the same scores; a changed one is refused by name.
    assert detection_experiment.main([*flags, "--resume"])["map50"] == summary["map50"]
    with pytest.raises(SystemExit, match="--lr"):
        detection_experiment.main([*flags, "--resume", "--lr", "0.1"])


def test_the_pytorch_twin_gives_the_same_maps(torch):
    from benchmarks.torch_models import twin  # imports torch: after the fixture

    model = models.get("yolo_tiny", num_classes=4)
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    # Statistics and scales away from their init, so the BatchNorms' mapping is checked too.
    rng = np.random.default_rng(2)
    variables = {"params": jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape, np.float32),
                                        variables["params"]),
                 "batch_stats": jax.tree.map(lambda a: a + 0.5 * rng.uniform(size=a.shape).astype(np.float32),
                                             variables["batch_stats"])}
    ours = jax.jit(partial(model.apply, train=False))(variables, x)
    net = twin("yolo_tiny", variables).eval()
    with torch.no_grad():
        theirs = net(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
    for a, b in zip(ours, theirs, strict=True):  # float32 rounding of maps up to a few hundred
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(np.asarray(a), b.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5 * scale)


def test_map_agrees_with_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    truth, detections, annotations, results = [], [], [], []
    for image in range(40):
        corner = rng.uniform(0, 90, (rng.integers(1, 5), 2))
        gt = np.concatenate([corner, corner + rng.uniform(10, 40, corner.shape)], 1)
        gt_classes = rng.integers(0, 3, len(gt))
        # Each object found with probability 0.8, its box jittered, its class sometimes wrong; then stray boxes.
        seen = rng.uniform(size=len(gt)) < 0.8
        found = gt[seen]
        stray = np.concatenate([c := rng.uniform(0, 90, (rng.integers(0, 4), 2)), c + rng.uniform(10, 40, c.shape)], 1)
        boxes = np.concatenate([found + rng.normal(0, 2, found.shape), stray])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        classes = np.where(rng.uniform(size=len(boxes)) < 0.85,
                           np.concatenate([gt_classes[seen], rng.integers(0, 3, len(stray))]),
                           rng.integers(0, 3, len(boxes)))
        scores = rng.uniform(size=len(boxes))
        truth.append((gt, gt_classes))
        detections.append((boxes, scores, classes))
        annotations += [{"id": len(annotations) + k + 1, "image_id": image, "category_id": int(c) + 1,
                         "bbox": [*b[:2], *(b[2:] - b[:2])], "area": float(np.prod(b[2:] - b[:2])), "iscrowd": 0}
                        for k, (b, c) in enumerate(zip(gt, gt_classes))]
        results += [{"image_id": image, "category_id": int(c) + 1, "bbox": [*b[:2], *(b[2:] - b[:2])],
                     "score": float(s)} for b, c, s in zip(boxes, classes, scores)]
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in range(40)], "annotations": annotations,
                    "categories": [{"id": c} for c in (1, 2, 3)]}
    coco.createIndex()
    evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    ours = mean_average_precision(detections, truth, num_classes=3)
    assert 0.1 < ours["map50_95"] < ours["map50"] < 0.9  # a mix, not a degenerate case
    assert ours == pytest.approx({"map50_95": evaluation.stats[0], "map50": evaluation.stats[1]}, abs=1e-9)
