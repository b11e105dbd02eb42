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

Every name read from these folders (``LATEST``, the file names in ``progress.json``) is untrusted
input: it must be a plain file name that resolves inside its folder, and no symbolic link is
followed (:func:`member`); anything else raises :class:`UnsafeCheckpointPath` naming the file
that held it, before anything is copied. The sha256 of every ``progress.json`` is also recorded
in the tracking store when committed (:func:`commit_digest`); given those digests,
:meth:`TrialStore.restore` refuses a commit the run did not record (a hand-made one whose files
match its own, forged ``progress.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rarn.checkpoint import atomic_write, file_sha256

__all__ = [
    "PROGRESS",
    "CheckpointCorrupted",
    "TrialStore",
    "UnsafeCheckpointPath",
    "check_tree",
    "commit_digest",
    "member",
]

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
_LATEST = "LATEST"
_COMMIT = re.compile(r"ckpt-\d{6,}")


class CheckpointCorrupted(RuntimeError):
    """A committed checkpoint's files differ from the sha256 recorded at commit time."""


class UnsafeCheckpointPath(CheckpointCorrupted, ValueError):
    """A file name read from a checkpoint folder leaves it, or a symbolic link would be followed
    (the message names the file that held the name)."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def member(folder: Path, name: object, source: Path) -> Path:
    """``folder / name`` for a plain file name read from the file ``source``.

    Raises:
        UnsafeCheckpointPath: ``name`` is not a plain name (a path, ``..``, empty, not a
            string), or ``folder / name`` is a symbolic link or resolves outside ``folder``.
    """
    bad = (not isinstance(name, str) or name in ("", ".", "..") or "/" in name
           or "\\" in name or "\0" in name)  # fmt: skip
    if bad:
        raise UnsafeCheckpointPath(
            f"{source}: file name {name!r} is not a plain file name inside {folder}; refused "
            "(nothing was copied). The file was edited by hand: delete it, or the run_dir"
        )
    path = folder / name
    if path.is_symlink() or (path.exists() and not _inside(path, folder)):
        raise UnsafeCheckpointPath(
            f"{source}: {path} is a symbolic link (or leaves {folder}); refused, no link is "
            "followed (nothing was copied). Delete it, or the run_dir"
        )
    return path


def _no_link(path: Path, what: str) -> Path:
    if path.is_symlink():
        raise UnsafeCheckpointPath(
            f"{what}: {path} is a symbolic link; refused, no link is followed out of the run "
            "directory (nothing was copied). Delete it to restart this trial from scratch"
        )
    return path


def commit_digest(commit: Path) -> str:
    """sha256 of a commit's ``progress.json``: it holds every file's sha256, so it identifies
    the commit (recorded in the tracking store when committed)."""
    return file_sha256(Path(commit) / PROGRESS)


def check_tree(root: Path, boundary: Path | None = None) -> None:
    """Refuse, before anything is read, what :meth:`TrialStore.restore` would refuse anywhere
    under ``root``: symbolic links out of ``boundary`` (default ``root``), ``LATEST`` files that
    do not name a commit, ``progress.json`` files naming anything but plain files.

    Raises:
        UnsafeCheckpointPath: names the file.
    """
    root = Path(root)
    boundary = Path(boundary or root)
    for dirpath, dirnames, filenames in os.walk(root):  # never descends into a linked folder
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = here / name
            if p.is_symlink() and not _inside(p, boundary):
                raise UnsafeCheckpointPath(
                    f"{p} is a symbolic link to {os.readlink(p)}, outside {boundary}; refused "
                    "(no link is followed out of the run directory). Delete it"
                )
        if _LATEST in filenames:
            _latest_name(here)
        if PROGRESS in filenames:
            progress = _read_progress(here)
            if progress is not None:
                for name in _files(progress, here / PROGRESS):
                    member(here, name, here / PROGRESS)


def _latest_name(root: Path) -> str:
    name = (root / _LATEST).read_text().strip()
    if name and not _COMMIT.fullmatch(name):
        raise UnsafeCheckpointPath(
            f"{root / _LATEST}: {name[:80]!r} does not name a commit (ckpt-NNNNNN) in {root}; "
            "refused. Delete it to resume this trial from Ray's checkpoint or from scratch"
        )
    return name


def _files(progress: dict[str, Any], source: Path) -> dict[str, Any]:
    files = progress.get("files")
    if not isinstance(files, dict) or not isinstance(progress.get("epoch"), int):
        raise CheckpointCorrupted(f"{source}: not a checkpoint record (no epoch or files)")
    return files


class _HasDirectory(Protocol):
    def as_directory(self) -> Any: ...


def _read_progress(d: Path) -> dict[str, Any] | None:
    try:
        progress = json.loads(_no_link(d / PROGRESS, str(d)).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def _verify(d: Path, progress: dict[str, Any], what: str) -> None:
    for name, recorded in _files(progress, d / PROGRESS).items():
        f = member(d, name, d / PROGRESS)
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
    boundary: Path | None = None  # the run directory: root must resolve inside it

    @property
    def work(self) -> Path:
        return self.root / "work"

    def latest(self) -> Path | None:
        """The newest local commit, or None.

        Raises:
            UnsafeCheckpointPath: ``LATEST`` names anything but a commit folder of this trial.
        """
        try:
            name = _latest_name(_no_link(self.root, "trial folder"))
        except OSError:
            return None
        d = self.root / name
        return _no_link(d, str(self.root / _LATEST)) if name and d.is_dir() else None

    def _check_root(self) -> None:
        if self.boundary is not None and not _inside(self.root, self.boundary):
            raise UnsafeCheckpointPath(
                f"{self.root} resolves to {self.root.resolve()}, outside the run directory "
                f"{self.boundary}; refused (a symbolic link in the run directory). Delete it"
            )
        _no_link(self.root, "trial folder")
        _no_link(self.work, "trial folder")

    def commit(
        self,
        epoch: int,
        extra: dict[str, Any] | None = None,
        record: Callable[[str], None] | None = None,
    ) -> Path:
        """Copy ``work/`` into ``ckpt-<epoch>/`` with digests; point ``LATEST`` at it.

        Args:
            record: called with the commit's :func:`commit_digest` before the commit appears
                (the tracking store learns of every commit before anyone can resume from it).
        """
        d = self.root / f"ckpt-{epoch:06d}"
        tmp = self.root / f".ckpt-{epoch:06d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {}
        for f in sorted(self.work.iterdir()):
            if f.is_file() and not f.is_symlink() and ".tmp" not in f.name:
                shutil.copy2(f, tmp / f.name)
                files[f.name] = file_sha256(tmp / f.name)
        progress = {"epoch": epoch, "files": files, "time": time.time(), **(extra or {})}
        (tmp / PROGRESS).write_text(json.dumps(progress, sort_keys=True))
        if record is not None:
            record(commit_digest(tmp))
        shutil.rmtree(d, ignore_errors=True)
        # A directory rename (atomic_path handles files): a reader sees ckpt-<epoch>/ whole or
        # not at all; LATEST still names the previous commit until the next line.
        os.replace(tmp, d)
        atomic_write(self.root / _LATEST, d.name)
        for old in self.root.glob("ckpt-*"):
            if old != d:
                shutil.rmtree(old, ignore_errors=True)
        return d

    def restore(
        self,
        reported: _HasDirectory | None,
        what: str,
        recorded: Collection[str] | None = None,
    ) -> dict[str, Any] | None:
        """Fill ``work/`` from the newest commit (Ray's or local); returns its progress record.

        The record holds ``epoch``, the files' digests and the epoch's ``metrics`` (if any were
        committed); None when there is nothing to resume from.

        Args:
            reported: the checkpoint Ray hands back on a retry or restore, or None.
            what: the trial's name for error messages.
            recorded: the :func:`commit_digest` values the tracking store holds for this trial
                (None: not checked); a commit not among them is not resumed from (a warning
                names it).

        Raises:
            CheckpointCorrupted: no copy of the newest commit matches its recorded digests.
            UnsafeCheckpointPath: a name in a commit leaves its folder, or is a link.
        """
        self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            sources = [self.latest()]
            if reported is not None:
                sources.append(Path(stack.enter_context(reported.as_directory())))
            found = [(p, d) for d in sources if d is not None and (p := _read_progress(d))
                     and isinstance(p.get("epoch"), int)]  # fmt: skip
            if recorded is not None:  # a commit the tracking store never saw is not resumed
                for _, d in found:
                    if commit_digest(d) not in recorded:
                        log.warning("%s: %s was not recorded in the tracking store when "
                                    "committed (edited or planted); not resumed from",
                                    what, d / PROGRESS)  # fmt: skip
                found = [(p, d) for p, d in found if commit_digest(d) in recorded]
            if not found:
                return None
            newest = max(p["epoch"] for p, _ in found)
            errors = []
            for progress, src in (c for c in found if c[0]["epoch"] == newest):
                try:  # the local copy first (no download); Ray's copy of the same commit next
                    _verify(src, progress, what)
                except UnsafeCheckpointPath:
                    raise
                except CheckpointCorrupted as e:
                    log.warning("%s", e)
                    errors.append(e)
                    continue
                for name in progress["files"]:
                    shutil.copy2(src / name, member(self.work, name, src / PROGRESS))
                log.info("%s: resuming from the checkpoint of epoch %d (%s)", what, newest, src)
                return progress
            raise errors[0]

    def record_attempt(self, start_epoch: int) -> None:
        """Append ``{pid, node_ip, start_epoch, time}`` to ``attempts.jsonl`` (what resumed from
        where, on which Ray node; ``node_ip`` is None outside Ray)."""
        line = {"pid": os.getpid(), "node_ip": _node_ip(), "start_epoch": start_epoch,
                "time": time.time()}  # fmt: skip
        with open(self.root / "attempts.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def _node_ip() -> str | None:
    """The Ray node this process runs on (None when Ray is not initialised here)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else None
