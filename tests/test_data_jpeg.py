"""cifar10-jpeg (rarn.data.jpeg), the disjoint retraining images, and which images each shipped
config's stages use: no stage but the evaluation ever sees a test image (issue 16)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from rarn.config import ConfigError, DataConfig, RetrainConfig, config_from_dict, load_config
from rarn.data import DataError, as_tensors, load_dataset, stage_ids
from rarn.data import jpeg as jpeg_mod

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared/data"
JPEG_NPZ = SHARED / "cifar10_jpeg.npz"
SUBSET_NPZ = SHARED / "cifar10_subset.npz"
needs_shared = pytest.mark.skipif(
    not (JPEG_NPZ.is_file() and SUBSET_NPZ.is_file()), reason="../shared/data is absent"
)
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
PAPER = {"cifar10", "study_cifar10"}  # search and retraining share the training images


def _mini_archive(path: Path, n_train: int = 60, n_test: int = 30, **override) -> Path:
    """An archive in cifar10_jpeg.npz's layout: random 32x32 JPEGs, labels j % 10."""
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        files = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
            files.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(files)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        arrays[f"{split}_y"] = np.arange(n, dtype=np.int64) % 10
        arrays[f"{split}_rank"] = (np.arange(n) // 10).astype(np.int16)
    arrays["class_names"] = np.array(jpeg_mod.CLASS_NAMES)
    arrays.update(override)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _cfg(path: Path, root: Path, **kw) -> DataConfig:
    return DataConfig(name="cifar10-jpeg", path=str(path), root=str(root), **kw)


def _count_decodes(monkeypatch) -> list[tuple[str, int, int]]:
    calls: list[tuple[str, int, int]] = []
    real = jpeg_mod.JpegArchive.decode

    def spy(self, split, start, stop):
        calls.append((split, start, stop))
        return real(self, split, start, stop)

    monkeypatch.setattr(jpeg_mod.JpegArchive, "decode", spy)
    return calls


# -- the dataset ---------------------------------------------------------------------------------


@needs_shared
def test_decoded_test_split_is_pixel_identical_to_the_subset(tmp_path):
    sha = hashlib.sha256(JPEG_NPZ.read_bytes()).hexdigest()
    b = load_dataset(_cfg(JPEG_NPZ, tmp_path, limit=20, test_limit=40, sha256=sha))
    subset = np.load(SUBSET_NPZ, allow_pickle=False)
    assert b.test.x.numpy().transpose(0, 2, 3, 1).tobytes() == subset["x"][:40].tobytes()
    assert b.test.y.tolist() == subset["y"][:40].tolist()
    assert (len(b.train), len(b.test), b.image_size, b.in_channels) == (20, 40, 32, 3)
    assert b.fingerprint == sha and b.retrain is None
    cached = sorted(p.name for p in (tmp_path / jpeg_mod.CACHE_DIR / sha).iterdir())
    assert cached == ["test.npz", "train.npz"]  # only the prefixes: 20 and 40 images
    assert len(np.load(tmp_path / jpeg_mod.CACHE_DIR / sha / "train.npz")["x"]) == 20


def test_prefixes_are_decoded_once_and_extended(tmp_path, monkeypatch):
    path = _mini_archive(tmp_path / "a.npz")
    calls = _count_decodes(monkeypatch)
    first = load_dataset(_cfg(path, tmp_path, limit=20, test_limit=10))
    assert [c for c in calls if c[1] < c[2]] == [("train", 0, 20), ("test", 0, 10)]
    calls.clear()
    again = load_dataset(_cfg(path, tmp_path, limit=20, test_limit=10))
    assert all(stop - start == 1 for _, start, stop in calls)  # only the cache's spot checks
    assert again.train.x.equal(first.train.x) and again.test.x.equal(first.test.x)
    calls.clear()
    more = load_dataset(_cfg(path, tmp_path, limit=40, test_limit=10))
    assert ("train", 20, 40) in calls and ("train", 0, 40) not in calls  # the missing part only
    assert more.train.x[:20].equal(first.train.x)  # prefixes: the same first images
    assert more.train.y.bincount(minlength=10).tolist() == [4] * 10  # class-balanced


@pytest.mark.parametrize("damage", ["pixels", "pixels_and_digest", "other_source", "truncated"])
def test_a_stale_or_tampered_cache_is_refused_and_rebuilt(tmp_path, damage, caplog):
    path = _mini_archive(tmp_path / "a.npz")
    cfg = _cfg(path, tmp_path, limit=30, test_limit=10)
    good = load_dataset(cfg).train.x.clone()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = tmp_path / jpeg_mod.CACHE_DIR / sha / "train.npz"
    d = dict(np.load(cache, allow_pickle=False))
    x = d["x"].copy()
    x[0, 0, 0] ^= 0xFF  # image 0 is a spot-checked one
    if damage == "pixels":
        d["x"] = x
    elif damage == "pixels_and_digest":  # consistent, so only decoding afresh can tell
        d["x"], d["x_sha256"] = x, np.array(hashlib.sha256(x.tobytes()).hexdigest())
    elif damage == "other_source":
        d["source_sha256"] = np.array("0" * 64)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:
        with open(cache, "wb") as fh:
            np.savez(fh, **d)
    with caplog.at_level(logging.WARNING, logger="rarn.data.jpeg"):
        again = load_dataset(cfg)
    assert again.train.x.equal(good)
    assert "rebuilding" in caplog.text and str(cache) in caplog.text
    assert dict(np.load(cache, allow_pickle=False))["x"].tobytes() != x.tobytes()  # rewritten


def test_missing_truncated_foreign_or_unexpected_files_name_the_path(tmp_path):
    path = _mini_archive(tmp_path / "a.npz")
    raw = path.read_bytes()
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match=f"file not found: {missing}"):
        load_dataset(_cfg(missing, tmp_path))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"{cut}.*(truncated|corrupt)"):
        load_dataset(_cfg(cut, tmp_path))
    foreign = tmp_path / "subset.npz"
    with open(foreign, "wb") as fh:  # cifar10_subset.npz's layout: x and y
        np.savez(fh, x=np.zeros((10, 32, 32, 3), np.uint8), y=np.arange(10))
    with pytest.raises(DataError, match=f"{foreign}: missing array"):
        load_dataset(_cfg(foreign, tmp_path))
    with pytest.raises(DataError, match=f"{path}: sha256 .* does not match data.sha256 0+"):
        load_dataset(_cfg(path, tmp_path, sha256="0" * 64))
    shuffled = _mini_archive(tmp_path / "s.npz", train_y=np.arange(60)[::-1] % 10)
    with pytest.raises(DataError, match=f"{shuffled}: train_y is not class-interleaved"):
        load_dataset(_cfg(shuffled, tmp_path))
    bad = _mini_archive(tmp_path / "b.npz", train_offsets=np.arange(61, dtype=np.int64))
    with pytest.raises(DataError, match=f"{bad}: train_offsets do not cut"):
        load_dataset(_cfg(bad, tmp_path))


def test_an_unreadable_image_is_named(tmp_path):
    path = _mini_archive(tmp_path / "a.npz", n_train=20)
    d = dict(np.load(path, allow_pickle=False))
    o = d["train_offsets"]
    d["train_jpeg"] = d["train_jpeg"].copy()
    d["train_jpeg"][o[13] : o[13] + 40] = 7  # image 13's header
    with open(path, "wb") as fh:
        np.savez(fh, **d)
    with pytest.raises(DataError, match=f"{path}: train image 13 is no JPEG"):
        load_dataset(_cfg(path, tmp_path, limit=20, test_limit=10))


# -- disjoint retraining images ------------------------------------------------------------------


def test_disjoint_retraining_images_follow_the_search_and_stay_balanced(tmp_path):
    path = _mini_archive(tmp_path / "a.npz")
    b = load_dataset(_cfg(path, tmp_path, limit=20, retrain_images="disjoint", retrain_limit=30))
    assert (len(b.train), len(b.retrain_set), len(b.test)) == (20, 30, 30)
    assert b.ids["search"].tolist() == list(range(20))
    assert b.ids["retrain"].tolist() == list(range(20, 50))
    assert b.ids["test"].tolist() == list(range(60, 90))  # after the 60 training ids
    assert b.retrain.y.bincount(minlength=10).tolist() == [3] * 10
    rest = load_dataset(_cfg(path, tmp_path, limit=20, retrain_images="disjoint"))
    assert len(rest.retrain_set) == 40  # retrain_limit 0: every image after the search's
    digits = load_dataset(DataConfig(limit=100, retrain_images="disjoint", retrain_limit=200))
    ids = digits.ids
    assert len(ids["retrain"]) == 200 and not np.intersect1d(ids["search"], ids["retrain"]).size
    assert not np.intersect1d(ids["test"], np.r_[ids["search"], ids["retrain"]]).size
    with pytest.raises(DataError, match="data.retrain_limit=50: only 40 training images"):
        load_dataset(_cfg(path, tmp_path, limit=20, retrain_images="disjoint", retrain_limit=50))


def test_the_retraining_trains_on_the_retraining_images(tmp_path):
    from rarn.robust.retrain import _loaders

    path = _mini_archive(tmp_path / "a.npz")
    b = load_dataset(_cfg(path, tmp_path, limit=20, retrain_images="disjoint", retrain_limit=30))
    cfg = RetrainConfig(batch_size=8, val_fraction=0.2)
    train, val = _loaders(cfg, b, (0, 1), torch.Generator())
    assert len(train.dataset) + len(val.dataset) == 30  # the retraining set, not the search's
    shared = dataclasses.replace(b, retrain=None)
    train, val = _loaders(cfg, shared, (0, 1), torch.Generator())
    assert len(train.dataset) + len(val.dataset) == 20


@pytest.mark.parametrize(
    "data, key",
    [
        ({"retrain_images": "disjoint"}, "data.limit"),
        ({"retrain_limit": 10}, "data.retrain_limit"),
        ({"retrain_images": "later"}, "data.retrain_images"),
        ({"sha256": "ABC"}, "data.sha256"),
    ],
)
def test_bad_data_options_are_config_errors_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"data": data})


# -- the shipped configs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_no_shipped_config_evaluates_on_an_image_it_searched_or_retrained_on(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    if cfg.data.name == "cifar10-jpeg" and not JPEG_NPZ.is_file():
        pytest.skip("../shared/data is absent")
    if cfg.data.path:  # relative to the repository root
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, path=str(ROOT / cfg.data.path))
        )
    ids = stage_ids(cfg.data)  # cifar10-jpeg: from the labels, no image decoded
    assert not np.intersect1d(ids["test"], ids["search"]).size
    assert not np.intersect1d(ids["test"], ids["retrain"]).size
    if name in PAPER:  # the paper: search on the 50,000 in halves, retrain on all, test 10,000
        assert len(ids["search"]) == 50_000 and len(ids["test"]) == 10_000
        assert np.array_equal(ids["search"], ids["retrain"])
        assert cfg.data.train_portion == 0.5
    elif "cifar10" in name:  # CPU configs: the search's images are not retrained on either
        assert cfg.data.retrain_images == "disjoint"
        assert not np.intersect1d(ids["search"], ids["retrain"]).size
    if "cifar10" in name:  # the CIFAR-10 configs train on the training split, never the test's
        assert cfg.data.name == "cifar10-jpeg"


@needs_shared
def test_cpu_config_stages_hold_different_images_by_content(tmp_path):
    """By pixels, not ids: a stage's digest differs and no decoded image recurs across stages;
    the test digest is the one the evaluation records carry."""
    from rarn.robust.evaluation import data_sha256
    from rarn.study import data_digests

    cfg = load_config(ROOT / "configs/cifar10_subset.yaml")
    b = load_dataset(dataclasses.replace(cfg.data, path=str(JPEG_NPZ), root=str(tmp_path)))

    def rows(ds) -> set[bytes]:
        x = ds.x.numpy()
        return {r.tobytes() for r in x.reshape(len(x), -1)}

    search, retrain, test = rows(b.train), rows(b.retrain_set), rows(b.test)
    assert len(search) == cfg.data.limit and len(test) == cfg.data.test_limit
    assert not (search & retrain) and not (test & (search | retrain))
    digests = data_digests(b)
    assert digests["test_data_sha256"] == data_sha256(*as_tensors(b.test))
    stages = [digests[f"{s}_data_sha256"] for s in ("search", "retrain", "test")]
    assert len(set(stages)) == 3 and digests["data_sha256"] == cfg.data.sha256
