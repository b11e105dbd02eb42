"""Seeded, class-balanced splits: the test hold-out, limits, and the search's D_T / D_V.

Every split is a pure function of the labels and a seed, so a run and its resume (or two Ray
workers) see the same images; prefixes visit the classes round-robin, so ``data.limit=200`` keeps
20 images of each of 10 classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from rarn.data.tensors import DataError, TensorImageDataset

__all__ = [
    "balanced_prefix",
    "dataset_labels",
    "search_split",
    "stratified_split",
    "take_rows",
    "training_indices",
]


def _rank_within_class(y: np.ndarray) -> np.ndarray:
    """Position of each element among the earlier elements of its class (0, 1, 2, ...)."""
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y)
    starts = np.cumsum(counts) - counts
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - np.repeat(starts, counts)
    return rank


def _interleave(y: np.ndarray) -> np.ndarray:
    """Order visiting the classes round-robin (keeping order within a class): prefixes balanced."""
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort((y, _rank_within_class(y)))


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded per-class hold-out of ``round(test_fraction * n_c)``; both parts class-interleaved."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g).numpy()
    ys = y[perm]
    n_test = np.round(test_fraction * np.bincount(ys)).astype(np.int64)
    is_test = _rank_within_class(ys) < n_test[ys]
    train, test = perm[~is_test], perm[is_test]
    return train[_interleave(y[train])], test[_interleave(y[test])]


def balanced_prefix(y: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` elements taken round-robin over classes (all when ``n`` is 0 or >= len)."""
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    return _interleave(y)[:n]


def training_indices(
    y: np.ndarray, limit: int, retrain_limit: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The search's and the retraining's images among training labels ``y``.

    Args:
        y: labels of the training split.
        limit: the search's images: the first ``limit`` in class-balanced order (0: all).
        retrain_limit: None when the retraining uses the search's images (the paper's protocol);
            else the retraining gets the ``retrain_limit`` images that follow the search's in the
            same order (0: all the rest), so the two sets are disjoint and both class-balanced.

    Returns:
        ``(search, retrain)``: indices into ``y``; ``retrain`` None for the shared protocol.

    Raises:
        DataError: the search would take every image, or fewer than ``retrain_limit`` remain.
    """
    if retrain_limit is None:
        return balanced_prefix(y, limit), None
    if limit <= 0 or limit >= len(y):
        raise DataError(
            f"data.limit={limit} leaves no image of the {len(y)} for a disjoint retraining "
            "(data.retrain_images=disjoint); set data.limit below the training split's size"
        )
    rest = _interleave(y)[limit:]
    n = retrain_limit or len(rest)
    if n > len(rest):
        raise DataError(
            f"data.retrain_limit={n}: only {len(rest)} training images follow the search's "
            f"{limit} (data.limit)"
        )
    return _interleave(y)[:limit], rest[:n]


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer labels of a dataset without decoding images."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.y.cpu().numpy()
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"{type(dataset).__name__}: no labels (.targets) to split or limit by")
    return np.asarray(targets, dtype=np.int64)


def take_rows(dataset: Dataset, indices: np.ndarray) -> Dataset:
    """Rows ``indices`` of ``dataset``: a compact copy when in memory, else a Subset."""
    if np.array_equal(indices, np.arange(len(dataset))):
        return dataset
    if isinstance(dataset, TensorImageDataset):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageDataset(dataset.x[idx], dataset.y[idx])
    return Subset(dataset, indices.tolist())


def search_split(
    dataset: Dataset, train_portion: float = 0.5, seed: int = 0
) -> tuple[Subset, Subset]:
    """Seeded split of the search data into D_T (weights) and D_V (architecture), spec §3.

    Args:
        dataset: the training set.
        train_portion: share of D_T, in (0, 1); ``floor(train_portion * N)`` samples.
        seed: seed of the permutation.

    Returns:
        ``(D_T, D_V)``: disjoint Subsets covering ``dataset``.
    """
    n = len(dataset)
    if not 0 < train_portion < 1:
        raise DataError(f"search_split: train_portion must be in (0, 1), got {train_portion}")
    n_t = math.floor(train_portion * n)
    if n_t < 1 or n_t > n - 1:
        raise DataError(
            f"search_split: {n} samples with train_portion={train_portion} leave D_T or D_V empty"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, perm[:n_t]), Subset(dataset, perm[n_t:])
