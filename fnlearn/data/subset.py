"""Class-balanced subsets: a figure measured on a subset must cover every class.

Folder data sets keep images in class order, so the first N images of CIFAR-10's
test split are airplanes and automobiles only; a subset must be drawn per class.
"""
import numpy as np


def stratified_subset(labels, n, seed=0):
    """Indices of `n` examples holding each class in its proportion in `labels`.

    Each class gets its share of `n` rounded down, and the examples left over go to
    the classes with the largest remainders; a class whose share rounds to none still
    gets one, taken from the class most over its share, where `n` allows one a class.
    Within a class the examples are a fixed random sample (by `seed`).

    Args:
      labels: (N,) integer class labels.
      n: how many examples to keep, 0 < n <= N.
      seed: the sample's seed.
    Returns:
      (n,) int64 indices into `labels`, sorted.
    """
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"a subset of {n} from {len(labels)} examples")
    classes, counts = np.unique(labels, return_counts=True)
    shares = counts * n / len(labels)
    take = np.floor(shares).astype(np.int64)
    leftover = n - take.sum()
    take[np.argsort(take - shares, kind="stable")[:leftover]] += 1  # largest remainders first
    if n >= len(classes):
        for i in np.flatnonzero(take == 0):  # a rare class: one example, from a class that keeps at least one
            take[i] = 1
            take[np.argmax(np.where(take > 1, take - shares, -np.inf))] -= 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))
