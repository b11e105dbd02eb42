"""Datasets for the RACL search and retraining: a registry of loaders and the D_T / D_V split.

RACL (Dong et al., "Adversarially Robust Neural Architectures", TPAMI 2025) searches on the
CIFAR-10 training split divided into D_T (network weights) and D_V (architecture distribution),
50/50 as in PC-DARTS (spec §3); :func:`search_split` makes that split. The retraining uses the
search's training images (the paper's protocol) or, with ``retrain_images: disjoint``, images the
search never saw (``DatasetBundle.retrain``); :func:`stage_ids` says which images each stage
uses, and no stage but the evaluation ever sees a test image. :func:`load_dataset` looks
``DataConfig.name`` up in :data:`DATASETS` and returns a :class:`DatasetBundle` whose ``train`` and
``test`` sets yield ``(image, label)`` with images float32 CHW in [0, 1] and int64 labels:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, 1 channel, no download),
  with a stratified, seeded ``test_fraction`` held out as test.
- ``cifar10``: torchvision's CIFAR-10 under ``root`` (downloaded only when ``download`` is set).
- ``cifar10-npz``: an ``.npz`` with uint8 NHWC ``x`` and int ``y`` (e.g. the shared JPEG-degraded
  CIFAR-10 test subset), split stratified and seeded into train/test.
- ``cifar10-jpeg``: all 60,000 CIFAR-10 images as JPEG bytes (``cifar10_jpeg.npz``): its
  training split for search and retraining, its test split for evaluation, decoded once into a
  cache under ``root`` (:mod:`~rarn.data.jpeg`).
- ``imagefolder``: torchvision ``ImageFolder`` trees ``root/train`` and ``root/val`` or
  ``root/test`` (Tiny-ImageNet, ImageNet layouts with class subfolders).

In-memory sets are :class:`TensorImageDataset` (uint8 stored compactly, converted on access), and
:func:`make_loader` iterates them by slicing tensors, with no per-item collate.

Rooms: :mod:`~rarn.data.tensors` (in-memory datasets and batch loaders), :mod:`~rarn.data.splits`
(seeded class-balanced splits), :mod:`~rarn.data.sources` (the registry and one loader per
dataset), :mod:`~rarn.data.npz` (reading ``.npz`` archives without pickle), :mod:`~rarn.data.jpeg`
(the JPEG archive, its decoding and cache).
"""

from __future__ import annotations

from rarn.data.sources import DATASETS, load_dataset, stage_ids
from rarn.data.splits import search_split
from rarn.data.tensors import (
    DataError,
    DatasetBundle,
    TensorBatchLoader,
    TensorImageDataset,
    as_tensors,
    make_loader,
)

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetBundle",
    "TensorBatchLoader",
    "TensorImageDataset",
    "as_tensors",
    "load_dataset",
    "make_loader",
    "search_split",
    "stage_ids",
]
