"""Safe training checkpoints: atomic writes, sha256 records, strict validation on load.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code is executed). :func:`save_checkpoint`
writes it atomically (temporary file + ``os.replace``) and records the file's sha256 next to it
(``<file>.sha256``); :func:`load_checkpoint` verifies that record (and an ``expected_sha256`` when
given), rejects files that are not checkpoint dicts of the expected format and kind or lack
required keys, and :func:`load_state_checked` compares keys and shapes before loading a state
dict, so a mismatch is reported by parameter name instead of half-loading a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_path",
    "atomic_write",
    "file_sha256",
    "load_checkpoint",
    "load_state_checked",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "rarn.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, tampered with, or does not match the model."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    The replacement is one ``os.replace`` (atomic on POSIX), so a reader sees the old file or the
    new one, never a half-written one; when the block raises, the temporary file is removed and
    ``path`` is untouched. The parent directory is created if needed.

    Example::

        with atomic_path("results.parquet") as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any], *, kind: str) -> str:
    """Write ``checkpoint`` atomically and record its sha256 in ``<path>.sha256``.

    Args:
        path: destination file.
        checkpoint: a dict of tensors, numbers, strings, lists and dicts.
        kind: what the checkpoint holds (e.g. ``"retrain"``, ``"best_model"``); checked on load.

    Returns:
        The hex sha256 of the written file.
    """
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "kind": kind, **checkpoint}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = file_sha256(tmp)
    atomic_write(_sidecar(path), f"{digest}  {path.name}\n")
    return digest


def load_checkpoint(
    path: str | Path,
    *,
    kind: str,
    required: Collection[str] = (),
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        kind: the kind it must have.
        required: keys it must contain.
        expected_sha256: when given, the file's sha256 must equal it. The ``.sha256`` record
            beside the file, when present, is always checked.

    Returns:
        The checkpoint dict (tensors on the CPU).

    Raises:
        CheckpointError: missing file, digest mismatch, unreadable or unsafe content, not a
            checkpoint dict, wrong format or kind, missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    digest = file_sha256(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match the expected {expected_sha256}"
        )
    side = _sidecar(path)
    if side.is_file():
        recorded = side.read_text().split()[0] if side.read_text().split() else ""
        if recorded != digest:
            raise CheckpointError(
                f"{path}: sha256 {digest} does not match the recorded {recorded!r} ({side.name}); "
                "the file was modified after it was written"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(state).__name__})")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a rarn checkpoint (format={state.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    if state.get("kind") != kind:
        raise CheckpointError(f"{path}: checkpoint kind {state.get('kind')!r}, expected {kind!r}")
    missing = sorted(set(required) - set(state))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


def load_state_checked(module: nn.Module, state: Mapping[str, Any], *, what: str = "model") -> None:
    """``module.load_state_dict(state)`` after checking keys and shapes, naming every mismatch.

    Args:
        module: the module to load into.
        state: its state dict.
        what: name used in error messages.

    Raises:
        CheckpointError: ``state`` is not a mapping of tensors, or keys or shapes differ.
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{what}: state is not a mapping of tensors")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(
            "shape mismatches " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else "")
        )
    if problems:
        raise CheckpointError(f"{what} does not match the checkpoint: " + ", ".join(problems))
    module.load_state_dict(state)
