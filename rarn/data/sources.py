"""The dataset registry and its loaders: digits, CIFAR-10 (torchvision or .npz), ImageFolder.

Each loader turns :class:`~rarn.config.DataConfig` into a :class:`~rarn.data.tensors.DatasetBundle`
and names the path and the problem in a :class:`~rarn.data.tensors.DataError` when the data are
missing or malformed. A new dataset is one function here and one entry in :data:`DATASETS`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rarn.config import ConfigError, DataConfig, check
from rarn.data.npz import read_npz
from rarn.data.splits import balanced_prefix, dataset_labels, stratified_split, take_rows
from rarn.data.tensors import DataError, DatasetBundle, TensorImageDataset

__all__ = ["DATASETS", "load_dataset"]

logger = logging.getLogger(__name__)


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
        keep = balanced_prefix(y, n)
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
    tr, te = stratified_split(labels, cfg.test_fraction, cfg.seed)
    return _in_memory_bundle(
        cfg, (x[tr], labels[tr]), (x[te], labels[te]), num_classes=10, fingerprint=digest
    )


def _load_cifar10_npz(cfg: DataConfig) -> DatasetBundle:
    path = Path(cfg.path)
    if not cfg.path or not path.is_file():
        raise DataError(f"cifar10-npz: file not found: {path} (set data.path to the .npz file)")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    arrays = read_npz(path, raw, ("x", "y"))
    x, y = arrays["x"], arrays["y"]
    _check_arrays(x, y, 10, str(path))
    x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW (a view; copied per part below)
    y = y.astype(np.int64)
    tr, te = stratified_split(y, cfg.test_fraction, cfg.seed)
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
        tr, te = stratified_split(dataset_labels(train), cfg.test_fraction, cfg.seed)
        train_set, test_set = take_rows(train, tr), take_rows(train, te)
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
        take_rows(train_set, balanced_prefix(dataset_labels(train_set), cfg.limit)),
        take_rows(test_set, balanced_prefix(dataset_labels(test_set), cfg.test_limit)),
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
        DataError: missing or malformed data (naming the path), or a field outside its range.
    """
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        raise KeyError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}") from None
    try:  # the config's own checks, for a DataConfig built directly in Python
        check(cfg)
    except ConfigError as e:
        raise DataError(str(e)) from None
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
