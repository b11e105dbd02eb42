"""One run per run directory: an exclusive lock file that names its holder.

``<run_dir>/.lock`` is held with ``fcntl.flock`` for the whole run and holds the owner's PID and
host as JSON. A second pipeline on the same run directory (a new run or ``--resume``) fails at
once with :class:`RunDirLocked`, naming them. The kernel drops the lock when its process dies;
a lock file left by a dead process on this host is taken over with a message. One left by
another host cannot be checked from here and is refused (delete it once that run is gone).
:func:`lock_holder` is the read-only check the pre-flight uses; :class:`RunDirLock` is the lock.

This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "RunDirLock", "RunDirLocked", "lock_holder"]

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another pipeline holds the run directory."""


def _read(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (starting up)"
    return f"PID {holder.get('pid')} on host {holder.get('host')}"


def _locked_message(run_dir: Path, holder: dict[str, Any]) -> str:
    return (
        f"run_dir {run_dir} is in use by {_describe(holder)} (lock file {run_dir / LOCK_FILE}); "
        "wait for that run to end, or use another run_dir"
    )


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir`` now (``{"pid", "host", ...}``), or None; writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_flock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        for _ in range(20):  # the holder writes its name right after taking the lock
            holder = _read(path)
            if holder:
                return holder
            time.sleep(0.05)
        return {}
    finally:
        os.close(fd)


class RunDirLock:
    """The exclusive lock of one run directory (a context manager).

    Args:
        run_dir: the run directory (created if absent).
        echo: where the take-over message of a stale lock goes.
    """

    def __init__(self, run_dir: str | Path, echo: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.echo = echo
        self._fd: int | None = None
        self.created = False  # acquire() created run_dir

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`RunDirLocked` naming its holder."""
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(fd):
                os.close(fd)
                raise RunDirLocked(_locked_message(self.run_dir, lock_holder(self.run_dir) or {}))
            # The file may have been unlinked by a releasing holder between open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            self._take_over(_read(self.path))
        except BaseException:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _take_over(self, stale: dict[str, Any]) -> None:
        """A lock file whose holder is gone (the flock was free): take it over, or refuse one
        from another host (its process cannot be checked from here)."""
        if not stale:
            return
        host, pid = stale.get("host"), stale.get("pid")
        if host != socket.gethostname():
            raise RunDirLocked(
                f"run_dir {self.run_dir} has a lock file of PID {pid} on host {host}; if that run "
                f"has ended, delete {self.path}"
            )
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise RunDirLocked(_locked_message(self.run_dir, stale))
        self.echo(f"[run] taking over the stale lock of PID {pid} on {host} (no longer running)")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
