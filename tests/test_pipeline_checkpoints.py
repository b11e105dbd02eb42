"""TrialStore: commits with digests, newest-of-two restore, corruption reported by file name."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.checkpoints import PROGRESS, CheckpointCorrupted, TrialStore


class _Reported:
    """Stands in for a Ray checkpoint: ``as_directory()`` yields a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def as_directory(self):
        yield str(self.path)


def _epoch(store: TrialStore, epoch: int) -> Path:
    store.work.mkdir(parents=True, exist_ok=True)
    (store.work / "checkpoint.pt").write_bytes(f"weights after epoch {epoch}".encode() * 100)
    (store.work / "genotype.json").write_text(json.dumps({"epoch": epoch}))
    return store.commit(epoch, extra={"metrics": {"val_acc": 0.1 * epoch}})


def test_commit_keeps_one_verified_checkpoint_and_restores_it(tmp_path):
    store = TrialStore(tmp_path / "t00")
    assert store.restore(None, what="t00") is None and store.latest() is None
    _epoch(store, 1)
    c2 = _epoch(store, 2)
    assert store.latest() == c2 and [p.name for p in store.root.glob("ckpt-*")] == [c2.name]
    progress = json.loads((c2 / PROGRESS).read_text())
    assert progress["epoch"] == 2 and set(progress["files"]) == {"checkpoint.pt", "genotype.json"}
    (store.work / "checkpoint.pt").write_bytes(b"half-written epoch 3")  # killed before commit
    progress = store.restore(None, what="t00")
    assert progress["epoch"] == 2 and progress["metrics"] == {"val_acc": 0.2}
    assert (store.work / "checkpoint.pt").read_bytes().startswith(b"weights after epoch 2")


def test_restore_takes_the_newer_of_ray_and_local(tmp_path):
    ray_side = TrialStore(tmp_path / "ray")
    local = TrialStore(tmp_path / "local")
    old = _epoch(ray_side, 1)  # Tune's snapshot lags behind after a driver SIGKILL
    _epoch(local, 3)
    assert local.restore(_Reported(old), what="t")["epoch"] == 3
    newer = _epoch(ray_side, 5)  # a retry on another node: Ray's copy is the newer one
    assert local.restore(_Reported(newer), what="t")["epoch"] == 5
    assert (local.work / "genotype.json").read_text() == json.dumps({"epoch": 5})


def test_a_corrupted_commit_names_the_file(tmp_path):
    store = TrialStore(tmp_path / "t02")
    ckpt = _epoch(store, 4)
    data = bytearray((ckpt / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load might not even notice
    (ckpt / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupted, match=r"t02: checkpoint file .*checkpoint\.pt"):
        store.restore(None, what="t02")
    (ckpt / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointCorrupted, match="missing"):
        store.restore(None, what="t02")
