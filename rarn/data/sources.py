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
from rarn.config.rules import choice_error, registry_rule
from rarn.data.jpeg import JpegArchive, decode_prefix, open_archive
from rarn.data.npz import read_npz
from rarn.data.splits import (
    balanced_prefix,
    dataset_labels,
    stratified_split,
    take_rows,
    training_indices,
)
from rarn.data.tensors import DataError, DatasetBundle, TensorImageDataset

__all__ = ["DATASETS", "load_dataset", "stage_ids"]

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


def _retrain_limit(cfg: DataConfig) -> int | None:
    """``retrain_limit`` of :func:`~rarn.data.splits.training_indices` (None: shared images)."""
    return cfg.retrain_limit if cfg.retrain_images == "disjoint" else None


def _tensor_set(x: np.ndarray, y: np.ndarray, keep: np.ndarray, size: int) -> TensorImageDataset:
    xt = _resize(torch.from_numpy(np.ascontiguousarray(x[keep])), size)
    return TensorImageDataset(xt, torch.from_numpy(y[keep].astype(np.int64)))


def _in_memory_bundle(
    cfg: DataConfig,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    fingerprint: str,
    ids: tuple[np.ndarray, np.ndarray] | None = None,
) -> DatasetBundle:
    """Limit (balanced prefixes; a disjoint retraining set after the search's), then resize,
    then wrap NCHW arrays as TensorImageDatasets. ``ids``: the source ids of the rows of
    ``train`` and ``test`` (default: train 0..n-1, test after them)."""
    (x, y), (xt, yt) = train, test
    try:
        search, retrain = training_indices(y, cfg.limit, _retrain_limit(cfg))
    except DataError as e:
        raise DataError(f"{cfg.name}: {e}") from None
    test_keep = balanced_prefix(yt, cfg.test_limit)
    id_train, id_test = ids or (np.arange(len(y)), len(y) + np.arange(len(yt)))
    size = cfg.image_size
    sets = [_tensor_set(x, y, search, size), _tensor_set(xt, yt, test_keep, size)]
    stage_ids = {"search": id_train[search], "test": id_test[test_keep]}
    retrain_set = None
    if retrain is not None:
        retrain_set = _tensor_set(x, y, retrain, size)
    stage_ids["retrain"] = id_train[search if retrain is None else retrain]
    c, side = sets[0].x.shape[1], sets[0].x.shape[-1]
    return DatasetBundle(
        sets[0], sets[1], num_classes, int(c), int(side), cfg.name, fingerprint, retrain_set,
        stage_ids,
    )  # fmt: skip


def _load_digits(cfg: DataConfig) -> DatasetBundle:
    from sklearn.datasets import load_digits  # heavy import, only for this dataset

    d = load_digits()
    images = np.ascontiguousarray(d.images, dtype="<f8")  # (1797, 8, 8), values 0..16
    labels = np.ascontiguousarray(d.target, dtype="<i8")
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    x = (images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    tr, te = stratified_split(labels, cfg.test_fraction, cfg.seed)
    return _in_memory_bundle(
        cfg, (x[tr], labels[tr]), (x[te], labels[te]), num_classes=10, fingerprint=digest,
        ids=(tr, te),
    )  # fmt: skip


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
    if cfg.sha256 and digest != cfg.sha256:
        raise DataError(f"{path}: sha256 {digest} does not match data.sha256 {cfg.sha256}")
    tr, te = stratified_split(y, cfg.test_fraction, cfg.seed)
    return _in_memory_bundle(
        cfg, (x[tr], y[tr]), (x[te], y[te]), num_classes=10, fingerprint=digest, ids=(tr, te)
    )


def _jpeg_plan(cfg: DataConfig) -> tuple[JpegArchive, np.ndarray, np.ndarray | None, np.ndarray]:
    """The verified archive and, from its labels alone, the indices of the search's, the
    retraining's (None: the search's) and the evaluation's images."""
    archive = open_archive(cfg.path, cfg.sha256)
    y, yt = archive.labels["train"], archive.labels["test"]
    try:
        search, retrain = training_indices(y, cfg.limit, _retrain_limit(cfg))
    except DataError as e:
        raise DataError(f"{archive.path}: {e}") from None
    return archive, search, retrain, balanced_prefix(yt, cfg.test_limit)


def _load_cifar10_jpeg(cfg: DataConfig) -> DatasetBundle:
    """The training split for search and retraining, the test split for evaluation; only the
    prefixes the limits ask for are decoded, through the cache under ``data.root``."""
    archive, search, retrain, test_keep = _jpeg_plan(cfg)
    y, yt = archive.labels["train"], archive.labels["test"]
    used = search if retrain is None else np.concatenate([search, retrain])
    n, nt = int(used.max()) + 1, int(test_keep.max()) + 1
    root = Path(cfg.root) if cfg.root else None
    # The file is class-interleaved (open_archive checks it), so these prefixes hold exactly the
    # balanced selections, which _in_memory_bundle recomputes on them.
    x = decode_prefix(archive, "train", n, root).transpose(0, 3, 1, 2)  # NHWC -> NCHW (a view)
    xt = decode_prefix(archive, "test", nt, root).transpose(0, 3, 1, 2)
    return _in_memory_bundle(
        cfg, (x, y[:n]), (xt, yt[:nt]), num_classes=10, fingerprint=archive.sha256,
        ids=(np.arange(n), len(y) + np.arange(nt)),
    )  # fmt: skip


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
    labels = dataset_labels(train_set)
    try:
        search, retrain = training_indices(labels, cfg.limit, _retrain_limit(cfg))
    except DataError as e:
        raise DataError(f"imagefolder: {root}: {e}") from None
    return DatasetBundle(
        take_rows(train_set, search),
        take_rows(test_set, balanced_prefix(dataset_labels(test_set), cfg.test_limit)),
        len(train.classes),
        int(c),
        int(side),
        cfg.name,
        hashlib.sha256(listing.encode()).hexdigest(),
        None if retrain is None else take_rows(train_set, retrain),
    )


DATASETS: dict[str, Callable[[DataConfig], DatasetBundle]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar10-npz": _load_cifar10_npz,
    "imagefolder": _load_imagefolder,
    "cifar10-jpeg": _load_cifar10_jpeg,
}


@registry_rule(DataConfig)
def _known_dataset(d: DataConfig) -> None:
    """``data.name`` is checked against :data:`DATASETS` when a config is built."""
    if d.name not in DATASETS:
        raise choice_error("data.name", d.name, DATASETS)


def stage_ids(cfg: DataConfig) -> dict[str, np.ndarray]:
    """Source ids of the images each stage uses: ``search``, ``retrain`` and ``test``.

    Ids are row numbers in the source, test ids after the training ids, so that an overlap is
    a set intersection (:attr:`DatasetBundle.ids`). ``cifar10-jpeg`` answers from its labels
    alone, without decoding an image; other datasets are loaded.
    """
    if cfg.name == "cifar10-jpeg":
        archive, search, retrain, test_keep = _jpeg_plan(cfg)
        retrain = search if retrain is None else retrain
        return {"search": search, "retrain": retrain,
                "test": len(archive.labels["train"]) + test_keep}  # fmt: skip
    return dict(load_dataset(cfg).ids)


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
