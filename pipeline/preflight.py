"""Checks that run before anything is written: config values, the run directory, ``--resume``.

Everything here raises :class:`rarn.config.ConfigError` or another ``ValueError`` (the CLI's
exit 2) and touches neither Ray nor MLflow, so a bad value fails in seconds with nothing on disk:
a run directory that cannot be created or written, one another pipeline holds
(:mod:`pipeline.runlock`), an unreadable ``state.json``, names in checkpoint files that leave
their folder and links out of the run directory (:func:`pipeline.checkpoints.check_tree`), and
Ray Tune files this run did not write (:mod:`pipeline.tune_state`) are refused here. The one
exception, :func:`check_resume_store`, reads the tracking store (once it answered): the digests
``--resume`` trusts are the store's, not ``state.json``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.runlock import LOCK_FILE, lock_holder
from pipeline.state import STATE_FILE, RunState
from rarn.config import Config, ConfigError, config_to_dict, load_config

__all__ = [
    "check_resume",
    "check_resume_store",
    "check_run_dir",
    "check_writable",
    "config_diff",
    "validate_config",
]


def validate_config(cfg: Config, stages: Sequence[str], resume: bool) -> None:
    """What only the pipeline knows, checked in the driver (raises ConfigError).

    Every value rule of the config itself (types, ranges, choices, registries, the trial grid)
    already ran in :func:`rarn.config.load_config`; what is left depends on the stages run.
    """
    from rarn.models.baselines import BASELINES
    from rarn.space.genotype import get_genotype

    if cfg.retrain.genotype == "searched":
        if "search" not in stages and "retrain" in stages and not resume:
            raise ConfigError("retrain.genotype=searched needs the search stage (or --resume)")
    elif cfg.retrain.genotype not in BASELINES:  # a named network needs no genotype file
        try:
            get_genotype(cfg.retrain.genotype)
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"retrain.genotype: {e}") from None


def check_run_dir(cfg: Config, resume: bool) -> Path:
    """The absolute run directory: empty (or absent) for a new run; for ``--resume`` one that
    holds a run whose stored config equals ``cfg``."""
    run_dir = Path(cfg.run_dir).resolve()
    check_writable(run_dir)
    holder = lock_holder(run_dir)
    if holder is not None and holder.get("pid") != os.getpid():  # not the caller's own lock
        who = f"PID {holder.get('pid')} on host {holder.get('host')}" if holder else "a process"
        raise ConfigError(f"run_dir {run_dir} is in use by {who}; wait for that run to end, "
                          "or use another run_dir")  # fmt: skip
    if resume and not (run_dir / STATE_FILE).is_file():
        raise ConfigError(f"--resume: no run to resume in {run_dir}")
    if not resume and run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise ConfigError(
            f"run_dir {run_dir} holds a previous run: pass --resume to continue it, or "
            "run_dir=<new folder> to start another"
        )
    if resume:
        stored = load_config(run_dir / "config.yaml")
        diff = config_diff(config_to_dict(stored), config_to_dict(cfg))
        if diff:
            raise ConfigError(f"--resume: config differs from {run_dir}/config.yaml: {diff}")
    return run_dir


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be created or written, before anything is written:
    a file (``/dev/null`` too) or a path under one, a name longer than the file system allows,
    a read-only or permission-denied parent.

    Raises:
        ConfigError: names the path and why.
    """

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"run_dir {run_dir}: {why}; use another run_dir")

    long = next((p for p in run_dir.parts if len(os.fsencode(p)) > 255), None)
    if long is not None or len(os.fsencode(str(run_dir))) > 4000:
        raise refuse(f"the name {(long or str(run_dir))[:40]}... is longer than the file system "
                     "allows (255 bytes a name)")  # fmt: skip
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == run_dir and not run_dir.is_dir():
        raise refuse("exists and is not a directory")
    if not existing.is_dir():
        raise refuse(f"{existing} is a file, not a directory: the run_dir cannot be created")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise refuse(f"{existing} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise refuse(f"{existing} is not writable (permission denied)")


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (``tune.param_space`` compared as one value)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) and k != "param_space":
            keys += config_diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def check_resume(cfg: Config, run_dir: Path, stages: Sequence[str]) -> RunState:
    """The run state to resume, read and checked before anything is written.

    Raises:
        pipeline.state.StateError: ``state.json`` is unreadable (the message names it).
        pipeline.checkpoints.UnsafeCheckpointPath: a checkpoint names a file outside its folder,
            or a symbolic link leads out of the run directory (the message names the file).
        pipeline.tune_state.UntrustedTuneState: the search would restore Tune files that this
            run did not write.
    """
    from pipeline.checkpoints import check_tree
    from pipeline.storage import run_storage_path
    from pipeline.tune_state import SNAPSHOTS, verify_storage

    check_tree(run_dir)  # names that leave their folder, links out of the run directory
    state = RunState.load(run_dir)
    if "search" in stages and state.search is None:
        verify_storage(run_storage_path(cfg, run_dir), state.tune_files,
                       snapshots=run_dir / SNAPSHOTS)  # fmt: skip
    return state


def check_resume_store(cfg: Config, run_dir: Path, stages: Sequence[str], state: RunState,
                       uri: str) -> None:  # fmt: skip
    """The checks of ``--resume`` against the tracking store (``uri``, from the config or the
    environment, already probed); reads only.

    The parent run ``state.json`` names must be a pipeline's parent run in that store, and
    every Ray Tune file the search would unpickle must have its sha256 recorded there.

    Raises:
        ValueError: the store does not hold the parent run.
        pipeline.tune_state.UntrustedTuneState: a Tune file the store did not record.
    """
    from pipeline.storage import run_storage_path
    from pipeline.tune_state import SNAPSHOTS, store_digests, verify_storage

    recorded = store_digests(uri, state.parent_run_id)
    if "search" in stages and state.search is None:
        verify_storage(run_storage_path(cfg, run_dir), recorded, where="the tracking store",
                       snapshots=run_dir / SNAPSHOTS)  # fmt: skip
