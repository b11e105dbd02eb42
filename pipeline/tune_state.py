"""Ray Tune's experiment files run code when restored: resume only from the ones this run wrote.

``Tuner.restore`` unpickles ``tuner.pkl``, the trials' ``*.pkl`` files (parameters, errors) and
the pickles embedded in the experiment and searcher state files (``experiment_state-*.json``,
``basic-variant-state-*.json``). A file planted in the run directory would run its code on
``--resume``. So the driver records the sha256 of every such file as Tune writes it, in the
tracking store (tags ``rarn.tune_sha256.<id>`` of the pipeline's parent run, :func:`digest_tags`)
and, as a cache, in ``state.json`` (:attr:`pipeline.state.RunState.tune_files`):
:func:`digest_recorder` hashes Tune's local staging copy after every loop step (the storage copy
is uploaded from it), and :func:`storage_digests` the stored files once ``fit`` returns.
:func:`verify_storage`, run by the pre-flight before ``--resume``, refuses any such file whose
digest was not recorded: first against ``state.json`` (no tracking store needed), then against
the tracking store (:func:`store_digests`), the one that counts: a planted pickle whose sha256
was written into ``state.json`` too is still refused.

A driver killed between Tune's save and the next record (a few milliseconds, but ``kill -9``
finds them: seen once in three runs of tests/test_pipeline_multinode.py) leaves a version in
storage that was never recorded. So the recorder also keeps a copy of each recorded version
beside the run (``<run_dir>/search/tune_recorded/``): ``--resume`` puts the last recorded
version back in place of an unrecorded one, when the copy's digest is the recorded one (the
resumed Tune state is then at most one loop step older; trials resume from their own verified
commits), and refuses as before when there is no such copy.

Trial checkpoints (``checkpoint_*`` folders) are not Tune's to unpickle: they hold this
pipeline's own files, verified against their own digests (:mod:`pipeline.checkpoints`).
This module imports Ray only inside :func:`digest_recorder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "TAG_PREFIX",
    "UntrustedTuneState",
    "digest_recorder",
    "digest_tags",
    "digests_from_tags",
    "merge_digests",
    "storage_digests",
    "store_digests",
    "verify_storage",
]

TAG_PREFIX = "rarn.tune_sha256."
SNAPSHOTS = "search/tune_recorded"  # under the run directory: the last recorded versions

log = logging.getLogger(__name__)

_KEEP = 8  # digests kept per file: the storage copy may lag Tune's staging copy by a few saves


class UntrustedTuneState(ValueError):
    """A file Ray Tune would unpickle on restore was not written by this run."""


def _unpickled(rel: PurePosixPath) -> bool:
    """Files that ``Tuner.restore`` unpickles (``rel`` is relative to the experiment folder)."""
    if any(part.startswith("checkpoint_") for part in rel.parts[:-1]):
        return False
    return rel.suffix == ".pkl" or (rel.suffix == ".json" and len(rel.parts) == 1)


def _is_experiment(names: set[str]) -> bool:
    return "tuner.pkl" in names or any(n.startswith("experiment_state") for n in names)


def _filesystem(storage: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path on it for a storage path or URI."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).resolve())


def _walk(fs: Any, root: str, only: set[str] | None) -> Iterator[tuple[str, PurePosixPath]]:
    """``(path on fs, path relative to root as 'experiment/...')`` of every unpickled file in
    the Tune experiment folders directly under ``root`` (``only``: those named, else all)."""
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError):
        return
    files = [i for i in infos if i.type == pyarrow.fs.FileType.File]
    by_dir: dict[str, set[str]] = {}
    for i in files:
        rel = PurePosixPath(i.path).relative_to(root)
        if len(rel.parts) == 2:
            by_dir.setdefault(rel.parts[0], set()).add(rel.parts[1])
    experiments = {d for d, names in by_dir.items() if _is_experiment(names)}
    if only is not None:
        experiments = only
    for i in files:
        rel = PurePosixPath(i.path).relative_to(root)
        if len(rel.parts) >= 2 and rel.parts[0] in experiments:
            if _unpickled(PurePosixPath(*rel.parts[1:])):
                yield i.path, rel


def _hash(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def storage_digests(storage: str, experiment: str | None = None) -> dict[str, str]:
    """sha256 of every file Tune would unpickle, in experiment ``experiment`` under
    ``storage`` (None: in every experiment there)."""
    fs, root = _filesystem(storage)
    only = None if experiment is None else {experiment}
    return {rel.as_posix(): _hash(fs, path) for path, rel in _walk(fs, root, only)}


def merge_digests(
    recorded: Mapping[str, list[str]], new: Mapping[str, str]
) -> dict[str, list[str]]:
    """``recorded`` with each new digest put first (the last :data:`_KEEP` are kept)."""
    out = {k: list(v) for k, v in recorded.items()}
    for name, digest in new.items():
        seen = [d for d in out.get(name, []) if d != digest]
        out[name] = [digest, *seen][:_KEEP]
    return out


def digest_tags(recorded: Mapping[str, list[str]], names: Iterable[str]) -> dict[str, str]:
    """Parent-run tags holding the recorded digests of ``names`` (a file's relative path may
    hold characters a tag key may not: the key is a hash of it, the value names it)."""
    out = {}
    for name in names:
        key = TAG_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:24]
        out[key] = json.dumps({"file": name, "sha256": list(recorded[name])})
    return out


def digests_from_tags(tags: Mapping[str, str]) -> dict[str, list[str]]:
    """The digests recorded as :func:`digest_tags` (other tags ignored)."""
    out: dict[str, list[str]] = {}
    for key, value in tags.items():
        if not key.startswith(TAG_PREFIX):
            continue
        try:
            d = json.loads(value)
            out[str(d["file"])] = [str(x) for x in d["sha256"]]
        except (ValueError, KeyError, TypeError):
            continue  # unreadable: recorded nothing
    return out


def store_digests(uri: str, parent_run_id: str) -> dict[str, list[str]]:
    """The digests the tracking store holds for the parent run (empty without one).

    Raises:
        ValueError: ``parent_run_id`` is not a pipeline's parent run in that store.
    """
    if not parent_run_id:
        return {}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking_uri import redact_uri

    missing = (f"--resume refused: state.json names parent run {parent_run_id!r}, which the "
               f"tracking store {redact_uri(uri)} does not hold (the tracking URI comes from the "
               "config or MLFLOW_TRACKING_URI, never from state.json: set the one this run "
               "used)")  # fmt: skip
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ValueError(missing)  # and do not create an empty database
    try:
        run = MlflowClient(tracking_uri=uri).get_run(parent_run_id)
    except MlflowException:
        raise ValueError(missing) from None
    if run.data.tags.get("rarn.role") != "pipeline":
        raise ValueError(f"--resume refused: state.json names run {parent_run_id!r}, which is "
                         "not a pipeline's parent run")  # fmt: skip
    return digests_from_tags(run.data.tags)


def _recorded_copies(bad: Iterable[str], recorded: Mapping[str, list[str]],
                     snapshots: Path | None) -> dict[str, bytes]:  # fmt: skip
    """The kept copies of ``bad`` files whose content has a recorded digest."""
    out = {}
    for name in bad if snapshots is not None else ():
        try:
            data = (snapshots / name).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() in recorded.get(name, ()):
            out[name] = data
    return out


def verify_storage(storage: str, recorded: Mapping[str, list[str]], where: str = "state.json",
                   *, snapshots: Path | None = None, restore: bool = False) -> None:  # fmt: skip
    """Refuse Tune files under ``storage`` whose digest this run did not record.

    The experiments checked are the ones this run recorded files of (others sharing the storage
    are not restored by it), or every experiment there when it recorded none. A file with a
    kept copy of a recorded version under ``snapshots`` is not refused; ``restore`` writes that
    copy in its place (the search stage, just before ``Tuner.restore``).

    Raises:
        UntrustedTuneState: names the files and how to continue without them.
    """
    fs, root = _filesystem(storage)
    only = {name.split("/", 1)[0] for name in recorded} or None
    found = {rel.as_posix(): _hash(fs, path) for path, rel in _walk(fs, root, only)}
    bad = [name for name, digest in sorted(found.items())
           if digest not in recorded.get(name, ())]  # fmt: skip
    copies = _recorded_copies(bad, recorded, snapshots)
    bad = [name for name in bad if name not in copies]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        experiments = sorted({f"{storage.rstrip('/')}/{b.split('/', 1)[0]}" for b in bad})
        raise UntrustedTuneState(
            f"--resume refused: Ray Tune would unpickle (run the code in) {shown}, which this "
            f"run did not write (sha256 not recorded in {where}). If you trust nothing else "
            f"changed, delete {', '.join(experiments)}: the search then restarts its trials "
            "from their own verified checkpoints"
        )
    for name, data in copies.items() if restore else ():
        with fs.open_output_stream(f"{root.rstrip('/')}/{name}") as f:
            f.write(data)
        log.warning("Tune's %s was saved after its last recorded version (the driver died in "
                    "between): resuming from that recorded version", name)  # fmt: skip


def _local_digests(staging: Path, experiment: str, cache: dict[str, tuple[int, int, str]]
                   ) -> dict[str, str]:  # fmt: skip
    """Digests of the unpickled files of one local experiment folder, rehashing only files
    whose size or mtime changed (``cache``: key -> (mtime_ns, size, digest))."""
    out = {}
    for p in staging.rglob("*"):
        rel = PurePosixPath(p.relative_to(staging).as_posix())
        if not p.is_file() or not _unpickled(rel):
            continue
        key, st = f"{experiment}/{rel.as_posix()}", p.stat()
        hit = cache.get(key)
        if hit is None or hit[:2] != (st.st_mtime_ns, st.st_size):
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            cache[key] = (st.st_mtime_ns, st.st_size, digest)
        out[key] = cache[key][2]
    return out


def _keep_copies(staging: Path, new: Mapping[str, str], snapshots: Path) -> None:
    """Copy each just-recorded file (``experiment/rel`` -> digest) to ``snapshots``, if its
    content is still the recorded one."""
    from rarn.checkpoint import atomic_write

    for key, digest in new.items():
        try:
            data = (staging / key.split("/", 1)[1]).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == digest:
            atomic_write(snapshots / key, data)


def digest_recorder(record: Callable[[dict[str, str]], None], snapshots: Path | None = None) -> Any:
    """A Tune callback that passes new digests of Tune's staging files to ``record``.

    Tune writes its state into a local staging folder and uploads that folder to the storage
    path; the callback hashes the staging folder at the end of every loop step (right after
    Tune's save) and keeps a copy of each recorded version under ``snapshots`` (for a driver
    killed between a save and its record: :func:`verify_storage`).
    """
    from ray.tune import Callback

    class _Recorder(Callback):
        def __init__(self) -> None:
            self.cache: dict[str, tuple[int, int, str]] = {}
            self.sent: dict[str, str] = {}

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            if not trials:
                return
            storage = trials[0].storage
            staging = Path(storage.experiment_driver_staging_path)
            if not staging.is_dir():
                return
            now = _local_digests(staging, storage.experiment_dir_name, self.cache)
            new = {k: v for k, v in now.items() if self.sent.get(k) != v}
            if new:
                record(new)
                self.sent.update(new)
                if snapshots is not None:
                    _keep_copies(staging, new, snapshots)

    return _Recorder()
