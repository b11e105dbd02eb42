"""Datasets for the RACL search and retraining: a registry of loaders and the D_T / D_V split.

RACL (Dong et al., "Adversarially Robust Neural Architectures", TPAMI 2025) searches on the
CIFAR-10 training split divided into D_T (network weights) and D_V (architecture distribution),
50/50 as in PC-DARTS (spec §3); :func:`search_split` makes that split. :func:`load_dataset` looks
``DataConfig.name`` up in :data:`DATASETS` and returns a :class:`DatasetBundle` whose ``train`` and
``test`` sets yield ``(image, label)`` with images float32 CHW in [0, 1] and int64 labels:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images, 1 channel, no download),
  with a stratified, seeded ``test_fraction`` held out as test.
- ``cifar10``: torchvision's CIFAR-10 under ``root`` (downloaded only when ``download`` is set).
- ``cifar10-npz``: an ``.npz`` with uint8 NHWC ``x`` and int ``y`` (e.g. the shared JPEG-degraded
  CIFAR-10 test subset), split stratified and seeded into train/test.
- ``imagefolder``: torchvision ``ImageFolder`` trees ``root/train`` and ``root/val`` or
  ``root/test`` (Tiny-ImageNet, ImageNet layouts with class subfolders).

In-memory sets are :class:`TensorImageDataset` (uint8 stored compactly, converted on access), and
:func:`make_loader` iterates them by slicing tensors, with no per-item collate.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from rarn.config import DataConfig

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
]

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- splits and limits


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


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded per-class hold-out of ``round(test_fraction * n_c)``; both parts class-interleaved."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g).numpy()
    ys = y[perm]
    n_test = np.round(test_fraction * np.bincount(ys)).astype(np.int64)
    is_test = _rank_within_class(ys) < n_test[ys]
    train, test = perm[~is_test], perm[is_test]
    return train[_interleave(y[train])], test[_interleave(y[test])]


def _balanced_prefix(y: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` elements taken round-robin over classes (all when ``n`` is 0 or >= len)."""
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    return _interleave(y)[:n]


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


def _labels(dataset: Dataset) -> np.ndarray:
    """Integer labels of a dataset without decoding images."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.y.cpu().numpy()
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"{type(dataset).__name__}: no labels (.targets) to split or limit by")
    return np.asarray(targets, dtype=np.int64)


def _take(dataset: Dataset, indices: np.ndarray) -> Dataset:
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
            yield self._base.batch(order[k * self.batch_size : (k + 1) * self.batch_size])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> TensorBatchLoader | DataLoader:
    """A re-iterable loader of ``(x, y)`` batches; ``len()`` is the number of batches.

    Args:
        dataset: a :class:`TensorImageDataset`, a Subset of one (fast tensor slicing), or any
            map-style dataset (torch ``DataLoader`` fallback, single process).
        batch_size: samples per batch.
        shuffle: draw a new permutation from ``generator`` at every iteration (epoch).
        generator: source of the permutations (torch's global RNG when None).
        drop_last: drop the final incomplete batch.

    Returns:
        An iterable of ``(x, y)``: float32 (B, C, H, W) in [0, 1] and int64 (B,).
    """
    if _resolve(dataset) is not None:
        return TensorBatchLoader(
            dataset, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
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


# --------------------------------------------------------------------------- dataset loaders


def _resize(x: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """Bilinear, antialiased resize of (N, C, H, W) to ``size`` x ``size``, keeping the dtype.

    uint8 is resized in float and rounded back (error <= 0.5/255), which keeps storage compact.
    """
    if size <= 0 or tuple(x.shape[-2:]) == (size, size):
        return x
    out = []
    for part in x.split(chunk):
        r = F.interpolate(
            part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        if x.dtype == torch.uint8:
            out.append(r.round_().clamp_(0, 255).to(torch.uint8))
        else:  # non-negative filter weights: only float rounding can leave [0, 1]
            out.append(r.clamp_(0, 1))
    return torch.cat(out)


def _check_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """Validate uint8 NHWC RGB images and integer labels in [0, num_classes)."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: 'x' must be uint8 (0..255), got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{where}: 'x' must be (N, H, W, 3) NHWC RGB, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: 'y' must be (N,) with N={len(x)}, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: 'y' must hold integer labels, got {y.dtype}")
    if len(x) == 0:
        raise DataError(f"{where}: no images")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(
            f"{where}: labels must be in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}"
        )


def _in_memory_bundle(
    cfg: DataConfig,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    fingerprint: str,
) -> DatasetBundle:
    """Limit (balanced prefixes), then resize, then wrap NCHW arrays as TensorImageDatasets."""
    sets = []
    for (x, y), n in ((train, cfg.limit), (test, cfg.test_limit)):
        keep = _balanced_prefix(y, n)
        xt = _resize(torch.from_numpy(np.ascontiguousarray(x[keep])), cfg.image_size)
        sets.append(TensorImageDataset(xt, torch.from_numpy(y[keep].astype(np.int64))))
    c, side = sets[0].x.shape[1], sets[0].x.shape[-1]
    return DatasetBundle(sets[0], sets[1], num_classes, int(c), int(side), cfg.name, fingerprint)


def _load_digits(cfg: DataConfig) -> DatasetBundle:
    from sklearn.datasets import load_digits  # heavy import, only for this dataset

    d = load_digits()
    images = np.ascontiguousarray(d.images, dtype="<f8")  # (1797, 8, 8), values 0..16
    labels = np.ascontiguousarray(d.target, dtype="<i8")
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    x = (images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    tr, te = _stratified_split(labels, cfg.test_fraction, cfg.seed)
    return _in_memory_bundle(
        cfg, (x[tr], labels[tr]), (x[te], labels[te]), num_classes=10, fingerprint=digest
    )


def _load_cifar10_npz(cfg: DataConfig) -> DatasetBundle:
    path = Path(cfg.path)
    if not cfg.path or not path.is_file():
        raise DataError(f"cifar10-npz: file not found: {path} (set data.path to the .npz file)")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; found {sorted(f.files)}")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except (OSError, ValueError) as e:  # not a zip / npz, or an object array needing pickle
        raise DataError(f"{path}: cannot read as .npz without pickle: {e}") from None
    _check_arrays(x, y, 10, str(path))
    x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW (a view; copied per part below)
    y = y.astype(np.int64)
    tr, te = _stratified_split(y, cfg.test_fraction, cfg.seed)
    return _in_memory_bundle(
        cfg, (x[tr], y[tr]), (x[te], y[te]), num_classes=10, fingerprint=digest
    )


def _load_cifar10(cfg: DataConfig) -> DatasetBundle:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root)
    try:
        sets = [CIFAR10(str(root), train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"cifar10: not found or corrupted under {root / 'cifar-10-batches-py'}; set "
            f"data.download=true to download it into {root}, or point data.root at the folder "
            "holding cifar-10-batches-py/"
        ) from None
    arrays = []
    h = hashlib.sha256()
    for s in sets:
        x, y = np.asarray(s.data), np.asarray(s.targets, dtype=np.int64)
        _check_arrays(x, y, 10, f"cifar10 ({root})")
        h.update(x.tobytes())
        h.update(y.tobytes())
        arrays.append((x.transpose(0, 3, 1, 2), y))
    return _in_memory_bundle(cfg, arrays[0], arrays[1], num_classes=10, fingerprint=h.hexdigest())


def _load_imagefolder(cfg: DataConfig) -> DatasetBundle:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    steps: list[Any] = [transforms.Resize((cfg.image_size, cfg.image_size))]
    tf = transforms.Compose((steps if cfg.image_size > 0 else []) + [transforms.ToTensor()])

    def folder(path: Path) -> ImageFolder:
        if (path / "val_annotations.txt").exists():
            raise DataError(
                f"imagefolder: {path} has the Tiny-ImageNet val layout (images/ + "
                "val_annotations.txt); expects class subfolders: move each image into "
                f"{path}/<class>/ first"
            )
        try:
            return ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"imagefolder: {path}: {e} (expects <split>/<class>/<image>)") from None

    if not (root / "train").is_dir():
        raise DataError(f"imagefolder: no train/ folder under {root} (set data.root)")
    train = folder(root / "train")
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if test_dir is None:  # no held-out split: hold out test_fraction of train
        tr, te = _stratified_split(_labels(train), cfg.test_fraction, cfg.seed)
        train_set, test_set = _take(train, tr), _take(train, te)
    else:
        test_set = folder(test_dir)
        if test_set.classes != train.classes:
            raise DataError(
                f"imagefolder: classes of {test_dir} differ from {root / 'train'} "
                f"({len(test_set.classes)} vs {len(train.classes)}); labels would not match"
            )
        train_set = train
    listing = "\n".join(
        f"{Path(p).relative_to(root).as_posix()}\t{Path(p).stat().st_size}"
        for p, _ in sorted(train.samples + getattr(test_set, "samples", []))
    )
    c, _, side = train[0][0].shape
    return DatasetBundle(
        _take(train_set, _balanced_prefix(_labels(train_set), cfg.limit)),
        _take(test_set, _balanced_prefix(_labels(test_set), cfg.test_limit)),
        len(train.classes),
        int(c),
        int(side),
        cfg.name,
        hashlib.sha256(listing.encode()).hexdigest(),
    )


DATASETS: dict[str, Callable[[DataConfig], DatasetBundle]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar10-npz": _load_cifar10_npz,
    "imagefolder": _load_imagefolder,
}


def load_dataset(cfg: DataConfig) -> DatasetBundle:
    """Load the dataset named by ``cfg.name`` from :data:`DATASETS`.

    Args:
        cfg: the data section (name, root/path, limits, test_fraction, image_size, seed,
            download).

    Returns:
        The :class:`DatasetBundle`; ``train`` and ``test`` yield float32 CHW images in [0, 1]
        and int64 labels.

    Raises:
        KeyError: unknown ``cfg.name`` (the message lists the known names).
        DataError: missing or malformed data, or invalid limits/fractions.
    """
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        raise KeyError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}") from None
    if not 0 < cfg.test_fraction < 1:
        raise DataError(f"data.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    if cfg.limit < 0 or cfg.test_limit < 0 or cfg.image_size < 0:
        raise DataError("data.limit, data.test_limit and data.image_size must be >= 0")
    bundle = loader(cfg)
    for split in ("train", "test"):
        if len(getattr(bundle, split)) == 0:
            raise DataError(f"{cfg.name}: the {split} split is empty (check limits/test_fraction)")
    logger.info(
        "loaded %s: %d train / %d test, %d classes, %dx%dx%d, sha256 %s",
        cfg.name,
        len(bundle.train),
        len(bundle.test),
        bundle.num_classes,
        bundle.in_channels,
        bundle.image_size,
        bundle.image_size,
        bundle.fingerprint[:12],
    )
    return bundle
