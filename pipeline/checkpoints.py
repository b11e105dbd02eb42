"""Per-trial checkpoint folders that survive worker kills and driver SIGKILLs.

``rarn`` writes its checkpoints into a scratch folder (``work/``) after every epoch. The epoch
callback *commits* them: copies the files into ``ckpt-<epoch>/`` together with
``progress.json`` (epoch and the sha256 of every file), then atomically points ``LATEST`` at it.
That folder is what the trial reports to Ray (``Checkpoint.from_directory``), so Ray's copy and
the local copy are the same commit.

On (re)start, :meth:`TrialStore.restore` takes the newest commit among Ray's checkpoint
(``tune.get_checkpoint()`` / ``ray.train.get_checkpoint()``) and the local one (newer after a
driver SIGKILL, when Tune's experiment snapshot lags behind), verifies every file's sha256 and
copies it into ``work/``; the ``rarn`` function then resumes from there. A commit whose files do
not match their recorded digests raises :class:`CheckpointCorrupted` naming the file: that
trial fails with a clear message, the others are unaffected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rarn.checkpoint import atomic_write, file_sha256

__all__ = ["PROGRESS", "CheckpointCorrupted", "TrialStore"]

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
_LATEST = "LATEST"


class CheckpointCorrupted(RuntimeError):
    """A committed checkpoint's files differ from the sha256 recorded at commit time."""


class _HasDirectory(Protocol):
    def as_directory(self) -> Any: ...


def _read_progress(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / PROGRESS).read_text())
    except (OSError, ValueError):
        return None


def _verify(d: Path, progress: dict[str, Any], what: str) -> None:
    for name, recorded in progress["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointCorrupted(f"{what}: {f} is missing (epoch {progress['epoch']})")
        digest = file_sha256(f)
        if digest != recorded:
            raise CheckpointCorrupted(
                f"{what}: checkpoint file {f} is corrupted (sha256 {digest[:16]}..., recorded "
                f"{recorded[:16]}... at epoch {progress['epoch']}); delete {d} to restart this "
                "trial from an earlier checkpoint or from scratch"
            )


@dataclass(frozen=True)
class TrialStore:
    """The stable folder of one trial (or one retraining rank)."""

    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    def latest(self) -> Path | None:
        try:
            name = (self.root / _LATEST).read_text().strip()
        except OSError:
            return None
        return self.root / name if name and (self.root / name).is_dir() else None

    def commit(self, epoch: int, extra: dict[str, Any] | None = None) -> Path:
        """Copy ``work/`` into ``ckpt-<epoch>/`` with digests; point ``LATEST`` at it."""
        d = self.root / f"ckpt-{epoch:06d}"
        tmp = self.root / f".ckpt-{epoch:06d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {}
        for f in sorted(self.work.iterdir()):
            if f.is_file() and ".tmp" not in f.name:
                shutil.copy2(f, tmp / f.name)
                files[f.name] = file_sha256(tmp / f.name)
        progress = {"epoch": epoch, "files": files, "time": time.time(), **(extra or {})}
        (tmp / PROGRESS).write_text(json.dumps(progress, sort_keys=True))
        shutil.rmtree(d, ignore_errors=True)
        # A directory rename (atomic_path handles files): a reader sees ckpt-<epoch>/ whole or
        # not at all; LATEST still names the previous commit until the next line.
        os.replace(tmp, d)
        atomic_write(self.root / _LATEST, d.name)
        for old in self.root.glob("ckpt-*"):
            if old != d:
                shutil.rmtree(old, ignore_errors=True)
        return d

    def restore(self, reported: _HasDirectory | None, what: str) -> dict[str, Any] | None:
        """Fill ``work/`` from the newest commit (Ray's or local); returns its progress record.

        The record holds ``epoch``, the files' digests and the epoch's ``metrics`` (if any were
        committed); None when there is nothing to resume from.

        Args:
            reported: the checkpoint Ray hands back on a retry or restore, or None.
            what: the trial's name for error messages.

        Raises:
            CheckpointCorrupted: no copy of the newest commit matches its recorded digests.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            sources = [self.latest()]
            if reported is not None:
                sources.append(Path(stack.enter_context(reported.as_directory())))
            found = [(p, d) for d in sources if d is not None and (p := _read_progress(d))]
            if not found:
                return None
            newest = max(p["epoch"] for p, _ in found)
            errors = []
            for progress, src in (c for c in found if c[0]["epoch"] == newest):
                try:  # the local copy first (no download); Ray's copy of the same commit next
                    _verify(src, progress, what)
                except CheckpointCorrupted as e:
                    log.warning("%s", e)
                    errors.append(e)
                    continue
                for name in progress["files"]:
                    shutil.copy2(src / name, self.work / name)
                log.info("%s: resuming from the checkpoint of epoch %d (%s)", what, newest, src)
                return progress
            raise errors[0]

    def record_attempt(self, start_epoch: int) -> None:
        """Append ``{pid, start_epoch, time}`` to ``attempts.jsonl`` (what resumed from where)."""
        line = {"pid": os.getpid(), "start_epoch": start_epoch, "time": time.time()}
        with open(self.root / "attempts.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
