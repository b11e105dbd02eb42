"""Tests for rarn.data: registry, in-memory datasets, splits, loaders and clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from rarn.config import DataConfig
from rarn.data import (
    DATASETS,
    DataError,
    DatasetBundle,
    TensorBatchLoader,
    TensorImageDataset,
    as_tensors,
    load_dataset,
    make_loader,
    search_split,
)

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared/data/cifar10_subset.npz"
SHARED_SHA256 = "da2b8f42163e690d71e3876c96bd8354f664081281750f8fe8555b623220a93d"


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset(DataConfig())


def _write_npz(path: Path, n: int = 40, **override: np.ndarray) -> Path:
    """Image i is constant with value i (so it can be traced), label i % 10."""
    arrays = {
        "x": np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 6, 6, 3)),
        "y": np.arange(n) % 10,
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def _order(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_dtypes(digits: DatasetBundle) -> None:
    assert (digits.name, digits.num_classes, digits.in_channels, digits.image_size) == (
        "digits",
        10,
        1,
        8,
    )
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=10)
    x, y = digits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    for split in (digits.train, digits.test):
        x, y = as_tensors(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1 and x.max() == 1  # 16/16 occurs
        assert set(y.tolist()) == set(range(10))
    assert len(digits.fingerprint) == 64 and int(digits.fingerprint, 16) >= 0


def test_digits_holdout_is_stratified_and_seeded(digits: DatasetBundle) -> None:
    xtr, ytr = as_tensors(digits.train)
    xte, yte = as_tensors(digits.test)
    counts = torch.bincount(yte, minlength=10)
    assert counts.max() - counts.min() <= 2  # per-class share of ~180 images each
    again = load_dataset(DataConfig())
    assert torch.equal(as_tensors(again.test)[0], xte)
    assert again.fingerprint == digits.fingerprint
    other = load_dataset(DataConfig(seed=1))
    assert not torch.equal(as_tensors(other.test)[0], xte)
    assert other.fingerprint == digits.fingerprint  # the source, not the split
    # Class-interleaved order: every prefix of 10k images holds k per class.
    assert torch.bincount(ytr[:100], minlength=10).tolist() == [10] * 10


def test_digits_resize_and_limits() -> None:
    b = load_dataset(DataConfig(image_size=16, limit=50, test_limit=20))
    assert b.image_size == 16 and len(b.train) == 50 and len(b.test) == 20
    x, y = as_tensors(b.train)
    assert x.shape == (50, 1, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    assert torch.bincount(as_tensors(b.test)[1], minlength=10).tolist() == [2] * 10


def test_unknown_name_and_bad_fields() -> None:
    with pytest.raises(KeyError, match="known: digits, cifar10, cifar10-npz, imagefolder"):
        load_dataset(DataConfig(name="mnist"))
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset(DataConfig(test_fraction=1.0))
    with pytest.raises(DataError, match=">= 0"):
        load_dataset(DataConfig(limit=-1))
    assert set(DATASETS) == {"digits", "cifar10", "cifar10-npz", "imagefolder", "cifar10-jpeg"}


# --------------------------------------------------------------------------- search split


def test_search_split_sizes_disjoint_seeded(digits: DatasetBundle) -> None:
    n = len(digits.train)
    d_t, d_v = search_split(digits.train, 0.5, seed=3)
    assert len(d_t) == n // 2 and len(d_t) + len(d_v) == n
    assert set(d_t.indices).isdisjoint(d_v.indices)
    assert sorted(d_t.indices + d_v.indices) == list(range(n))
    again_t, _ = search_split(digits.train, 0.5, seed=3)
    other_t, _ = search_split(digits.train, 0.5, seed=4)
    assert again_t.indices == d_t.indices and other_t.indices != d_t.indices
    assert len(search_split(digits.train, 0.8, seed=0)[0]) == int(0.8 * n)
    for bad in (0.0, 1.0):
        with pytest.raises(DataError, match="train_portion"):
            search_split(digits.train, bad)
    with pytest.raises(DataError, match="empty"):
        search_split(Subset(digits.train, [0]), 0.5)


# --------------------------------------------------------------------------- loaders


def test_loader_matches_items_and_covers_subset(digits: DatasetBundle) -> None:
    d_t, _ = search_split(digits.train, 0.5, seed=0)
    loader = make_loader(d_t, 64, shuffle=False)
    assert isinstance(loader, TensorBatchLoader) and len(loader) == -(-len(d_t) // 64)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    ref_x = torch.stack([d_t[i][0] for i in range(len(d_t))])
    ref_y = torch.stack([d_t[i][1] for i in range(len(d_t))])
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    ax, ay = as_tensors(d_t)
    assert torch.equal(ax, ref_x) and torch.equal(ay, ref_y)
    # Nested Subsets resolve to the same in-memory base.
    nested = Subset(d_t, [5, 0, 7])
    assert torch.equal(as_tensors(nested)[0], ref_x[[5, 0, 7]])
    last = make_loader(d_t, 64, shuffle=False, drop_last=True)
    assert len(last) == len(d_t) // 64 and all(len(yb) == 64 for _, yb in last)


def test_loader_seeded_and_reshuffles_each_epoch(digits: DatasetBundle) -> None:
    d_t, _ = search_split(digits.train, 0.5, seed=0)
    a = make_loader(d_t, 100, shuffle=True, generator=torch.Generator().manual_seed(7))
    b = make_loader(d_t, 100, shuffle=True, generator=torch.Generator().manual_seed(7))
    a1, a2 = [torch.cat([x.flatten(1) for x, _ in a]) for _ in range(2)]
    b1, b2 = [torch.cat([x.flatten(1) for x, _ in b]) for _ in range(2)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same generator seed, same epochs
    assert not torch.equal(a1, a2)  # a new permutation per epoch
    assert a1.shape == a2.shape == (len(d_t), 64)  # both epochs: a permutation of D_T
    assert torch.equal(torch.unique(a1, dim=0), torch.unique(a2, dim=0))
    assert sorted(_order(a)) == sorted(d_t[i][1].item() for i in range(len(d_t)))


def test_loader_falls_back_to_dataloader() -> None:
    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.full((1, 2, 2), i / 10), torch.tensor(i)

    loader = make_loader(Plain(), 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(loader, DataLoader) and len(loader) == 3
    assert sorted(_order(loader)) == list(range(10))
    x, y = as_tensors(Plain())
    assert x.shape == (10, 1, 2, 2) and y.tolist() == list(range(10))


def test_tensor_dataset_uint8_storage_and_validation() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2)
    ds = TensorImageDataset(x, [1, 0])
    assert ds.x.dtype == torch.uint8 and len(ds) == 2 and ds.targets == [1, 0]
    assert ds.to("cpu").x.dtype == torch.uint8
    assert torch.equal(ds[1][0], x[1].float() / 255)
    bx, by = ds.batch(torch.tensor([1, 0]))
    assert torch.equal(bx, x[[1, 0]].float() / 255) and by.tolist() == [0, 1]
    # torch's DataLoader uses __getitems__ and collates its list of samples.
    dx, dy = next(iter(DataLoader(ds, batch_size=2)))
    assert torch.equal(dx, x.float() / 255) and dy.tolist() == [1, 0]
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        TensorImageDataset(x[0], [1])
    with pytest.raises(DataError, match="labels"):
        TensorImageDataset(x, [1, 0, 2])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        TensorImageDataset(x.float(), [1, 0])
    with pytest.raises(DataError, match="integers"):
        TensorImageDataset(x, torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------- cifar10-npz


def test_npz_happy_path(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "c.npz")
    b = load_dataset(DataConfig(name="cifar10-npz", path=str(path), test_fraction=0.25))
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 6)
    assert (len(b.train), len(b.test)) == (30, 10)
    assert b.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    seen = []
    for split in (b.train, b.test):
        x, y = as_tensors(split)
        assert x.shape[1:] == (3, 6, 6) and x.dtype == torch.float32
        ids = (x[:, 0, 0, 0] * 255).round().long()  # image i has value i everywhere
        assert torch.equal(x, (ids.float() / 255)[:, None, None, None].expand_as(x))
        assert torch.equal(y, ids % 10)  # labels travel with their images
        seen += ids.tolist()
    assert sorted(seen) == list(range(40))  # train/test disjoint and complete
    assert torch.bincount(as_tensors(b.test)[1], minlength=10).tolist() == [1] * 10
    small = load_dataset(
        DataConfig(name="cifar10-npz", path=str(path), limit=10, test_limit=5, image_size=12)
    )
    assert len(small.train) == 10 and len(small.test) == 5 and small.image_size == 12
    x, y = as_tensors(small.train)
    assert x.shape == (10, 3, 12, 12) and sorted(y.tolist()) == list(range(10))
    assert small.train.x.dtype == torch.uint8  # resized sets stay compact


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"x": np.zeros((40, 6, 6, 3), np.float32)}, "must be uint8"),
        ({"x": np.zeros((40, 6, 6), np.uint8)}, r"\(N, H, W, 3\)"),
        ({"x": np.zeros((40, 6, 6, 1), np.uint8)}, r"\(N, H, W, 3\)"),
        ({"y": np.arange(40) % 11}, r"labels must be in 0\.\.9"),
        ({"y": np.arange(40) % 10 - 1}, r"labels must be in 0\.\.9"),
        ({"y": (np.arange(40) % 10).astype(np.float32)}, "integer labels"),
        ({"y": np.arange(39) % 10}, r"'y' must be \(N,\)"),
        ({"x": np.zeros((0, 6, 6, 3), np.uint8), "y": np.zeros(0, np.int64)}, "no images"),
    ],
)
def test_npz_errors(tmp_path: Path, override: dict, match: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=match) as info:
        load_dataset(DataConfig(name="cifar10-npz", path=str(path)))
    assert str(path) in str(info.value)


def test_npz_missing_file_key_and_not_npz(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="file not found") as info:
        load_dataset(DataConfig(name="cifar10-npz", path=str(missing)))
    assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(name="cifar10-npz"))
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, x=np.zeros((4, 6, 6, 3), np.uint8))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]"):
        load_dataset(DataConfig(name="cifar10-npz", path=str(no_y)))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz at all")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(DataConfig(name="cifar10-npz", path=str(junk)))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="pickle"):
        load_dataset(DataConfig(name="cifar10-npz", path=str(pickled)))


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="../shared/data/cifar10_subset.npz absent")
def test_shared_cifar10_npz() -> None:
    b = load_dataset(
        DataConfig(name="cifar10-npz", path=str(SHARED_NPZ), limit=200, test_limit=100)
    )
    assert b.fingerprint == SHARED_SHA256
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
    x, y = as_tensors(b.train)
    assert x.shape == (200, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    assert torch.bincount(as_tensors(b.test)[1], minlength=10).tolist() == [10] * 10


# --------------------------------------------------------------------------- imagefolder


def _png_tree(root: Path, splits: dict[str, int], classes=("ant", "bee")) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_imagefolder_train_val(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": 3, "val": 2})
    b = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))
    assert (b.num_classes, b.in_channels, b.image_size) == (2, 3, 8)
    assert (len(b.train), len(b.test)) == (6, 4) and len(b.fingerprint) == 64
    loader = make_loader(b.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(loader, DataLoader) and len(loader) == 2
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    tx, ty = as_tensors(b.test)
    assert tx.shape == (4, 3, 8, 8) and ty.tolist() == [0, 0, 1, 1]
    limited = load_dataset(
        DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, limit=2)
    )
    assert sorted(as_tensors(limited.train)[1].tolist()) == [0, 1]
    assert limited.fingerprint == b.fingerprint


def test_imagefolder_without_val_holds_out_and_native_size(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": 5})
    b = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), test_fraction=0.4))
    assert (len(b.train), len(b.test)) == (6, 4) and b.image_size == 12  # native 10x12: width
    assert sorted(as_tensors(b.test)[1].tolist()) == [0, 0, 1, 1]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train/ folder") as info:
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert str(tmp_path) in str(info.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="expects <split>/<class>/<image>"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    tiny = tmp_path / "tiny"
    _png_tree(tiny, {"train": 1})
    (tiny / "val" / "images").mkdir(parents=True)
    (tiny / "val" / "val_annotations.txt").write_text("0.png\tant\n")
    with pytest.raises(DataError, match="val_annotations.txt.*class subfolders"):
        load_dataset(DataConfig(name="imagefolder", root=str(tiny)))
    other = tmp_path / "other"
    _png_tree(other, {"train": 1})
    _png_tree(other, {"test": 1}, classes=("ant", "cat"))
    with pytest.raises(DataError, match="classes of .*test differ"):
        load_dataset(DataConfig(name="imagefolder", root=str(other)))


# --------------------------------------------------------------------------- cifar10


def test_cifar10_without_download_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.download=true") as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nothing")))
    assert str(tmp_path / "nothing") in str(info.value)
