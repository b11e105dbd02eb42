"""In-memory image datasets and the batch loaders that slice them.

A :class:`TensorImageDataset` keeps uint8 images as uint8 (a quarter of float32's memory) and
converts a whole batch at once; :class:`TensorBatchLoader` iterates it, or Subsets of it, by
tensor indexing with no per-item collate, which is what makes small-image training fast on a CPU.
:class:`DatasetBundle` is what :func:`rarn.data.load_dataset` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "Batch",
    "DataError",
    "DatasetBundle",
    "TensorBatchLoader",
    "TensorImageDataset",
    "as_tensors",
    "make_loader",
]

Batch = tuple[Tensor, Tensor]  # (B, C, H, W) float32 in [0, 1], (B,) int64


class DataError(ValueError):
    """A dataset is missing, malformed or empty; the message names the path and the problem."""


class TensorImageDataset(Dataset):
    """Images and labels held in memory as tensors.

    uint8 images (0..255) are stored as uint8, a quarter of the float32 memory, and divided by 255
    on access; floating images must already lie in [0, 1] and are stored as float32.

    Args:
        x: images, (N, C, H, W), uint8 or floating.
        y: integer labels, (N,).
    """

    def __init__(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray | Sequence[int]) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.ndim != 4:
            raise DataError(
                f"TensorImageDataset: images must be (N, C, H, W), got {tuple(x.shape)}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"TensorImageDataset: labels must be (N,) with N={len(x)}, got {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataError(f"TensorImageDataset: labels must be integers, got {y.dtype}")
        if x.dtype != torch.uint8:
            if not x.is_floating_point():
                raise DataError(f"TensorImageDataset: images must be uint8 or float, got {x.dtype}")
            x = x.float()
            if x.numel() and not (x.min() >= 0 and x.max() <= 1):
                raise DataError("TensorImageDataset: float images must lie in [0, 1]")
        self.x = x.contiguous()
        self.y = y.long().contiguous()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # A copy either way, so in-place edits by callers (attacks) never reach the storage.
        x = self.x[index]
        return (self._convert(x) if x.dtype == torch.uint8 else x.clone()), self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        # torch DataLoader / Subset protocol: a list of samples, converted in one vectorised step.
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0)))

    def batch(self, indices: Tensor | Sequence[int]) -> Batch:
        """Images and labels at ``indices`` as one batch.

        Args:
            indices: integer positions (a tensor on any device, or a sequence).

        Returns:
            ``(x, y)``: float32 (B, C, H, W) in [0, 1] and int64 (B,), on this dataset's device.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.x.device)
        return self._convert(self.x.index_select(0, idx)), self.y.index_select(0, idx)

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """A copy with images and labels on ``device`` (uint8 stays uint8)."""
        return TensorImageDataset(self.x.to(device), self.y.to(device))

    @property
    def targets(self) -> list[int]:
        """Labels as a list, as on torchvision datasets."""
        return self.y.tolist()

    def _convert(self, x: Tensor) -> Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """A loaded dataset: train and test sets plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int  # side length of the (square) images
    name: str
    fingerprint: str  # sha256 hex of the source (file bytes, arrays or file listing)
    # The retraining's images when they differ from the search's (data.retrain_images=disjoint);
    # None: the retraining uses `train`, as the paper's protocol does.
    retrain: Dataset | None = None
    # Source image ids of each stage's images ("search", "retrain", "test"): row numbers in the
    # source, test ids after the training ids where the source has both splits, so overlaps are
    # set intersections (empty when the loader cannot tell, e.g. ImageFolder).
    ids: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def retrain_set(self) -> Dataset:
        """The images the retraining trains on: ``retrain`` when set, else ``train``."""
        return self.train if self.retrain is None else self.retrain


def _resolve(dataset: Dataset) -> tuple[TensorImageDataset, Tensor | None] | None:
    """The in-memory base of a (possibly nested) Subset and the index map into it, else None."""
    if isinstance(dataset, TensorImageDataset):
        return dataset, None
    if isinstance(dataset, Subset):
        inner = _resolve(dataset.dataset)
        if inner is None:
            return None
        base, idx = inner
        sub = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return base, sub if idx is None else idx[sub]
    return None


# --------------------------------------------------------------------------- loaders


class TensorBatchLoader:
    """Batches of an in-memory dataset (or Subsets of one) by tensor indexing.

    Each iteration is one epoch; with ``shuffle`` it draws a fresh permutation from
    ``generator``, so a seeded generator gives a reproducible sequence of epochs.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        resolved = _resolve(dataset)
        if resolved is None:
            raise TypeError(f"TensorBatchLoader needs an in-memory dataset, got {type(dataset)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.pin_memory = False  # page-locked batches (make_loader's pin_memory)
        self._base, idx = resolved
        self._index = None if idx is None else idx.to(self._base.x.device)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[Batch]:
        n, device = len(self.dataset), self._base.x.device
        if self.shuffle:
            g = self.generator
            order = torch.randperm(n, generator=g, device=g.device if g is not None else "cpu")
            order = order.to(device)
        else:
            order = torch.arange(n, device=device)
        if self._index is not None:
            order = self._index[order]
        for k in range(len(self)):
            x, y = self._base.batch(order[k * self.batch_size : (k + 1) * self.batch_size])
            pin = self.pin_memory and x.device.type == "cpu"  # host data only
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> TensorBatchLoader | DataLoader:
    """A re-iterable loader of ``(x, y)`` batches; ``len()`` is the number of batches.

    Args:
        dataset: a :class:`TensorImageDataset`, a Subset of one (fast tensor slicing), or any
            map-style dataset (torch ``DataLoader`` fallback, single process).
        batch_size: samples per batch.
        shuffle: draw a new permutation from ``generator`` at every iteration (epoch).
        generator: source of the permutations (torch's global RNG when None).
        drop_last: drop the final incomplete batch.
        pin_memory: page-locked batches, so that ``.to(cuda, non_blocking=True)`` copies
            asynchronously while the GPU still works on the previous step (set it only when
            training on CUDA: pinning needs a CUDA runtime and costs a host copy).

    Returns:
        An iterable of ``(x, y)``: float32 (B, C, H, W) in [0, 1] and int64 (B,).
    """
    if _resolve(dataset) is not None:
        loader = TensorBatchLoader(
            dataset, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
        )
        loader.pin_memory = pin_memory
        return loader
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )


def as_tensors(dataset: Dataset, batch_size: int = 256) -> Batch:
    """All images and labels of a dataset as two tensors.

    Args:
        dataset: an in-memory dataset or Subset of one (sliced directly), or any map-style
            dataset with equal-size images (collected through a DataLoader).
        batch_size: batch size of the DataLoader fallback.

    Returns:
        ``(x, y)``: float32 (N, C, H, W) in [0, 1] and int64 (N,).
    """
    resolved = _resolve(dataset)
    if resolved is not None:
        base, idx = resolved
        return base.batch(torch.arange(len(base)) if idx is None else idx)
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
    if not xs:
        raise DataError(f"as_tensors: {type(dataset).__name__} is empty")
    return torch.cat(xs), torch.cat(ys)
