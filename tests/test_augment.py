"""Batch augmentation: values checked against NumPy references, run under jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnlearn.data import augment


def _images(b=8, h=6, w=5, c=3, seed=0):
    # Distinct positive values, so every pixel can be traced back to its source.
    rng = np.random.default_rng(seed)
    return (rng.permutation(b * h * w * c).reshape(b, h, w, c) + 1).astype(np.float32)


def _np_shift(image, dy, dx, mode):
    """NumPy reference for one image: out[y, x] = in[y - dy, x - dx], border filled per `mode`."""
    p = max(abs(dy), abs(dx), 1)
    padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode=mode)
    h, w = image.shape[:2]
    return padded[p - dy : p - dy + h, p - dx : p - dx + w]


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_shift_matches_numpy(mode):
    images = _images(b=4)
    shifts = np.array([[0, 0], [2, -1], [-2, 2], [1, 0]])
    out = jax.jit(augment.shift, static_argnames=("max_shift", "mode"))(images, shifts, max_shift=2, mode=mode)
    for image, (dy, dx), got in zip(images, shifts, np.asarray(out)):
        np.testing.assert_array_equal(got, _np_shift(image, dy, dx, mode))


def _find_shift(image, out, max_shift):
    """All (dy, dx) under which `out` is `image` shifted with zero fill."""
    return [
        (dy, dx)
        for dy in range(-max_shift, max_shift + 1)
        for dx in range(-max_shift, max_shift + 1)
        if np.array_equal(out, _np_shift(image, dy, dx, "constant"))
    ]


@pytest.mark.parametrize("fn", [augment.random_crop, augment.random_translate])
def test_random_crop_and_translate_stay_in_bounds(fn):
    images = _images(b=32, h=8, w=8)
    out = jax.jit(fn, static_argnums=2)(jax.random.key(0), images, 2)
    assert out.shape == images.shape and out.dtype == images.dtype
    shifts = set()
    for image, got in zip(images, np.asarray(out)):
        found = _find_shift(image, got, 2)
        assert len(found) == 1  # every output is exactly one in-range zero-filled shift
        shifts.add(found[0])
    assert len(shifts) > 5  # 25 possible shifts over 32 images: they differ per image


def test_random_translate_uint8_and_reflect_keeps_image_pixels():
    images = _images(b=16, h=8, w=8).astype(np.uint8)  # values wrap but stay per-image data
    out = np.asarray(augment.random_translate(jax.random.key(1), images, 3, mode="reflect"))
    assert out.dtype == np.uint8
    for image, got in zip(images, out):
        # Reflect padding never invents values: each pixel comes from the same image.
        assert set(map(tuple, got.reshape(-1, 3))) <= set(map(tuple, image.reshape(-1, 3)))


def test_flip_and_random_flip():
    images = _images(b=64)
    np.testing.assert_array_equal(augment.flip(images), images[:, :, ::-1])
    out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(2), images))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert np.all(flipped ^ same)  # each image is exactly one of the two
    assert 10 < flipped.sum() < 54  # about half of 64


def _flipped_mask(out, images):
    return np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(np.asarray(out), images)])


def test_alternating_flip_alternates_per_dataset_index():
    images = _images(b=64)
    indices = jnp.arange(100, 164)
    key = jax.random.key(3)
    step = jax.jit(augment.alternating_flip)
    masks = [_flipped_mask(step(key, images, indices, epoch), images) for epoch in range(4)]
    for a, b in zip(masks, masks[1:]):
        assert np.all(a ^ b)  # each epoch flips exactly what the previous one did not
    np.testing.assert_array_equal(masks[0], masks[2])
    assert 10 < masks[0].sum() < 54
    # The decision follows the data set index, not the position in the batch.
    perm = np.random.default_rng(0).permutation(64)
    permuted = _flipped_mask(step(key, images[perm], indices[perm], 0), images[perm])
    np.testing.assert_array_equal(permuted, masks[0][perm])


def test_normalize_uint8_and_float_agree():
    images = np.random.default_rng(4).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    out = jax.jit(augment.normalize)(images, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    expected = (images / 255 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    from_float = augment.normalize(images.astype(np.float32) / 255, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    np.testing.assert_allclose(from_float, out, rtol=1e-5, atol=1e-5)
    assert augment.normalize(images, augment.CIFAR10_MEAN, augment.CIFAR10_STD, jnp.bfloat16).dtype == jnp.bfloat16


def test_tta_views_are_airbench_views():
    images = _images(b=2)
    views, weights = augment.tta_views(images, translate=1)
    assert views.shape == (6, *images.shape)
    np.testing.assert_allclose(weights, [0.25, 0.25, 0.125, 0.125, 0.125, 0.125])
    down_right = np.stack([_np_shift(x, 1, 1, "reflect") for x in images])
    up_left = np.stack([_np_shift(x, -1, -1, "reflect") for x in images])
    expected = [images, images[:, :, ::-1], down_right, down_right[:, :, ::-1], up_left, up_left[:, :, ::-1]]
    for got, want in zip(views, expected):
        np.testing.assert_array_equal(got, want)
    views, weights = augment.tta_views(images, translate=0)
    assert views.shape[0] == 2 and np.allclose(weights, 0.5)


def test_tta_logits_averages_the_views_under_jit():
    images = _images(b=3, h=6, w=5, c=2)
    w = np.random.default_rng(5).normal(size=(6 * 5 * 2, 4)).astype(np.float32)

    def logits_fn(x):  # linear, so the mean of logits is the logits of the mean view
        return x.reshape(x.shape[0], -1) @ w

    got = jax.jit(functools.partial(augment.tta_logits, logits_fn))(images)
    views = [images, images[:, :, ::-1]]
    for dy in (1, -1):
        shifted = np.stack([_np_shift(x, dy, dy, "reflect") for x in images])
        views += [shifted, shifted[:, :, ::-1]]
    mean_view = sum(wt * v for wt, v in zip([0.25, 0.25, 0.125, 0.125, 0.125, 0.125], views))
    np.testing.assert_allclose(got, logits_fn(mean_view), rtol=1e-4, atol=1e-3)
    # The images are not mirror-symmetric, so leaving out the flipped views changes the answer.
    no_flip = (0.5 * views[0] + 0.25 * views[2] + 0.25 * views[4])
    assert not np.allclose(got, logits_fn(no_flip), rtol=1e-3, atol=1e-2)
    mirror_only = augment.tta_logits(logits_fn, images, translate=0)
    np.testing.assert_allclose(mirror_only, logits_fn(0.5 * (views[0] + views[1])), rtol=1e-4, atol=1e-3)
