"""Batch augmentation on the device: pure functions of explicit keys, all usable inside `jax.jit`.

Images are NHWC, uint8 or float. Sizes that set shapes (`padding`, `max_shift`,
`translate`) must be static under jit, e.g. `jax.jit(f, static_argnames="padding")`.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Per-channel statistics of the training images, in [0, 1] units (the usual
# CIFAR-10 std; the 0.2023/0.1994/0.2010 seen in many tutorials is a miscomputed one).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
# ImageNet's, which torchvision's pretrained weights expect their inputs normalised with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A recipe's `normalization` -> (mean, std).
NORMALIZATIONS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """Scales images to zero mean and unit variance per channel.

    Args:
      images: (..., C) integer images in [0, 255] (divided by 255 first) or
        float images in [0, 1].
      mean: (C,) per-channel mean in [0, 1] units.
      std: (C,) per-channel standard deviation in [0, 1] units.
      dtype: output dtype.

    Returns:
      (..., C) `(images / 255 - mean) / std` in `dtype`.
    """
    x = images.astype(dtype)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255
    return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def flip(images: jax.Array) -> jax.Array:
    """Mirrors images left to right.

    Args:
      images: (B, H, W, C).

    Returns:
      (B, H, W, C) with the W axis reversed.
    """
    return images[:, :, ::-1, :]


def _flip_where(mask: jax.Array, images: jax.Array) -> jax.Array:
    """Flips the images whose (B,) `mask` entry is True."""
    return jnp.where(mask[:, None, None, None], flip(images), images)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left to right with probability 1/2.

    Args:
      key: PRNG key.
      images: (B, H, W, C).

    Returns:
      (B, H, W, C).
    """
    return _flip_where(jax.random.bernoulli(key, 0.5, (images.shape[0],)), images)


def alternating_flip(key: jax.Array, images: jax.Array, indices: jax.Array, epoch) -> jax.Array:
    """Flips each image on every other epoch, starting from a random half (airbench).

    Every image is seen mirrored and unmirrored in any two consecutive epochs,
    which beats independent coin flips that leave some images unmirrored for
    several epochs in a row.

    Args:
      key: PRNG key fixed for the whole run; it picks which images flip on even epochs.
      images: (B, H, W, C).
      indices: (B,) integer positions of the images in the data set.
      epoch: epoch number (int or traced integer scalar).

    Returns:
      (B, H, W, C), image `i` flipped iff `bernoulli(fold_in(key, i)) XOR (epoch is odd)`.
    """
    base = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(indices)
    return _flip_where(base ^ (jnp.asarray(epoch) % 2 == 1), images)


def shift(images: jax.Array, shifts: jax.Array, max_shift: int, mode: str = "constant") -> jax.Array:
    """Shifts each image by its own integer offset, filling the uncovered border.

    Args:
      images: (B, H, W, C).
      shifts: (B, 2) integer `(dy, dx)`, each in [-max_shift, max_shift];
        positive moves the content down / right: `out[y, x] = in[y - dy, x - dx]`.
      max_shift: static bound on |shift|, the padding width.
      mode: "constant" fills with zeros; "reflect" mirrors the border
        without repeating the edge pixel (`jnp.pad` modes).

    Returns:
      (B, H, W, C), same dtype.
    """
    b, h, w, c = images.shape
    p = max_shift
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=mode)  # (B, H+2p, W+2p, C)
    starts = p - jnp.clip(shifts, -p, p)

    def crop(image, start):
        return jax.lax.dynamic_slice(image, (start[0], start[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, starts)


def random_translate(key: jax.Array, images: jax.Array, max_shift: int, mode: str = "constant") -> jax.Array:
    """Shifts each image by a random `(dy, dx)`, each uniform in [-max_shift, max_shift].

    Args:
      key: PRNG key.
      images: (B, H, W, C).
      max_shift: static largest shift in pixels.
      mode: border fill, "constant" (zeros) or "reflect" (airbench's choice).

    Returns:
      (B, H, W, C), same dtype.
    """
    shifts = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1)
    return shift(images, shifts, max_shift, mode)


def random_crop(key: jax.Array, images: jax.Array, padding: int, mode: str = "constant") -> jax.Array:
    """Pads each image by `padding` and takes a random crop of the original size (torchvision's RandomCrop).

    A corner drawn uniformly from the (2p+1)^2 positions is a shift by
    (p - top, p - left), so this is `random_translate` with `max_shift=padding`.

    Args:
      key: PRNG key.
      images: (B, H, W, C).
      padding: static pad width on every side.
      mode: "constant" (zeros, torchvision's default) or "reflect".

    Returns:
      (B, H, W, C), same dtype.
    """
    return random_translate(key, images, padding, mode)


def tta_views(images: jax.Array, translate: int = 1) -> tuple[jax.Array, jax.Array]:
    """The test-time views of airbench and their weights: the image, its mirror, and both shifted.

    Views, in order: x, flip(x); then, when `translate > 0`, t(x) and
    flip(t(x)) for the shift down-right by `translate` pixels and for the shift
    up-left, with reflect padding. Weights are 1/4 for the two unshifted views
    and 1/8 for the four shifted ones (airbench: half on the mirror pair, half
    on the mean of the shifted pairs); without shifts, 1/2 each.

    Args:
      images: (B, H, W, C).
      translate: static shift in pixels; 0 gives the two mirror views only.

    Returns:
      `(views, weights)`: (V, B, H, W, C) with V = 2 or 6, and (V,) float32 summing to 1.
    """
    views = [images, flip(images)]
    if translate == 0:
        return jnp.stack(views), jnp.full((2,), 0.5, jnp.float32)
    b = images.shape[0]
    for offset in (translate, -translate):
        shifted = shift(images, jnp.full((b, 2), offset), translate, mode="reflect")
        views += [shifted, flip(shifted)]
    weights = jnp.array([1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8], jnp.float32)
    return jnp.stack(views), weights


def tta_logits(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array, translate: int = 1) -> jax.Array:
    """Averages a model's logits over the `tta_views`, with their weights (no softmax, as airbench).

    Args:
      logits_fn: maps (N, H, W, C) images to (N, K) logits; called once on all
        views stacked, so it sees a batch V times larger.
      images: (B, H, W, C).
      translate: static shift for the shifted views; 0 uses the mirror pair only.

    Returns:
      (B, K) weighted mean of the views' logits, float32.
    """
    views, weights = tta_views(images, translate)
    v, b = views.shape[:2]
    logits = logits_fn(views.reshape(v * b, *views.shape[2:]))
    logits = logits.reshape(v, b, *logits.shape[1:]).astype(jnp.float32)
    return jnp.tensordot(weights, logits, axes=1)


def random_flip_boxes(key: jax.Array, images: jax.Array, boxes: jax.Array, classes: jax.Array):
    """Mirrors each (B, H, W, C) image left to right with probability 1/2, and its (B, K, 4) xyxy
    pixel boxes with it (padding, class -1, stays zero). Returns `(images, boxes)`."""
    mask = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    width = images.shape[2]
    mirrored = jnp.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], -1)
    flipped = mask[:, None, None] & (classes >= 0)[..., None]
    return _flip_where(mask, images), jnp.where(flipped, mirrored, boxes)


def random_scale_boxes(key: jax.Array, images: jax.Array, boxes: jax.Array, classes: jax.Array,
                       scale: tuple[float, float] = (0.75, 1.25), min_visible: float = 0.5):
    """Zooms each (B, H, W, C) image by a factor drawn from `scale`, placed at random in the same
    frame (zoomed in: cropped; zoomed out: on black), moving its (B, K, 4) xyxy boxes with it.

    A box is clipped to the frame, and dropped (class -1, box 0) where less than `min_visible`
    of it stays inside. Images come back float32 in the input's range. Returns
    `(images, boxes, classes)`.
    """
    b, h, w, _ = images.shape
    size_key, place_key = jax.random.split(key)
    s = jax.random.uniform(size_key, (b,), minval=scale[0], maxval=scale[1])
    room = jnp.stack([h - s * h, w - s * w], -1)  # (B, 2): <0 when zoomed in
    shift = jax.random.uniform(place_key, (b, 2)) * room  # in [room, 0] or [0, room]

    def zoom(image, s, shift):
        return jax.image.scale_and_translate(image.astype(jnp.float32), image.shape, (0, 1), jnp.stack([s, s]),
                                             shift, method="linear", antialias=False)

    images = jax.vmap(zoom)(images, s, shift)
    moved = boxes * s[:, None, None] + jnp.concatenate([shift[:, ::-1], shift[:, ::-1]], -1)[:, None, :]
    clipped = jnp.clip(moved, 0, jnp.array([w, h, w, h], jnp.float32))

    def area(box):
        return jnp.prod(jnp.clip(box[..., 2:] - box[..., :2], 0, None), -1)

    keep = (classes >= 0) & (area(clipped) >= min_visible * jnp.maximum(area(moved), 1e-6))
    return images, jnp.where(keep[..., None], clipped, 0.0), jnp.where(keep, classes, -1)
