"""Search stage: N RACL searches in parallel on Ray Tune, then top-k selection.

The trainable is a thin adapter around :func:`rarn.nas.search.run_search`; its Ray touch-points are
numbered like Ray's own examples. Data reach the trials once through the object store
(``tune.with_parameters``); every epoch reports metrics with a checkpoint (``tune.report``); a
retried or restored trial resumes from ``tune.get_checkpoint()`` (or from its newer local commit
after a driver SIGKILL, see :mod:`pipeline.checkpoints`, also when the checkpoint Tune restores
is gone from storage: :class:`LocalCommitFallback`); ``FailureConfig`` retries killed
workers; ``Tuner.restore`` continues an interrupted experiment.

The param space is expanded into explicit trial points with stable keys (``t00``, ``t01``, ...)
by :mod:`pipeline.trials`; a trial's Tune folder is named after its key, so its MLflow run, its
stable folder, its checkpoints and its result (public ``ResultGrid`` API only) are found again
after any restart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pipeline.checkpoints import TrialStore
from pipeline.state import TrialOutcome
from pipeline.storage import join_storage
from pipeline.tracking import ChildRun, Tracking, allowed_params, download_checked
from pipeline.trials import VARIANT, trial_points, with_overrides
from rarn.checkpoint import atomic_write
from rarn.config import Config, ConfigError, config_to_dict
from rarn.nas.loop import SearchData, SearchResult, run_search
from rarn.space.genotype import Genotype

__all__ = [
    "LocalCommitFallback",
    "SearchJob",
    "build_tuner",
    "collect_outcomes",
    "fit",
    "experiment_name",
    "load_genotypes",
    "search_trainable",
    "select_top_k",
]

log = logging.getLogger(__name__)
EXPERIMENT = "search"


# ----------------------------------------------------------------------------------------------
# The trainable


@dataclass(frozen=True)
class SearchJob:
    """What every trial needs besides its data: base config, lineage handle, run folder."""

    cfg: Config
    tracking: Tracking
    run_dir: str

    def store(self, key: str) -> TrialStore:
        return TrialStore(Path(self.run_dir) / "search" / "trials" / key, Path(self.run_dir))


def search_trainable(config: dict[str, Any], *, data: SearchData, job: SearchJob) -> None:
    """One Tune trial: one RACL search, reported epoch by epoch."""
    point = {k: v for k, v in config["trial"].items() if k != "key"}
    key, cfg = config["trial"]["key"], with_overrides(job.cfg, point)
    store, run = job.store(key), _trial_run(job, key, cfg, point)
    commits = run.commit_digests()  # what this trial committed before (the tracking store's)

    def record(digest: str) -> None:  # before the commit appears (TrialStore.commit)
        commits[:] = run.record_commit(commits, digest)

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        ckpt = store.commit(epoch, extra={"metrics": dict(metrics)}, record=record)
        run.log_metrics(metrics, step=epoch)
        _log_genotype(run, ckpt / "genotype.json")  # a trial ASHA stops keeps its genotype
        # [2] Report every epoch, with the committed checkpoint.
        tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(str(ckpt)))

    with run.failing_on_error():
        # [1] Resume from Tune's checkpoint (retry or restore) or the newer local commit.
        progress = store.restore(tune.get_checkpoint(), f"search trial {key}", commits)
        store.record_attempt(run.resumed(progress))
        # [3] The search itself: pure PyTorch, resuming from store.work (GPU when granted one).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result = run_search(cfg.search, cfg.constraint, data, callbacks=[report],
                            checkpoint_dir=store.work, device=device)  # fmt: skip
        _log_genotype(run, store.root / "genotype.json", result)


class LocalCommitFallback:
    """Mixin of the trainable's Tune class: a Tune checkpoint that is gone from storage is not
    an error, the trial then resumes from its own newest commit.

    After a driver SIGKILL, Tune's experiment snapshot can name a ``checkpoint_*`` folder that
    ``CheckpointConfig(num_to_keep=1)`` already deleted when the next one arrived (the snapshot
    is written after the deletion, and uploaded asynchronously). ``Tuner.restore`` then has the
    trial actor run ``Trainable.restore`` on it, which raises "Could not recover from checkpoint
    as it does not exist on storage anymore" before the trainable's code runs, on every retry.
    The commit in the trial's stable folder (:class:`pipeline.checkpoints.TrialStore`) is the
    authoritative copy, so the restore is skipped: ``tune.get_checkpoint()`` is None and
    :meth:`TrialStore.restore` takes the local commit. Mixed in through ``__mixins__``, the hook
    Ray's ``wrap_function`` offers for function trainables.
    """

    def restore(self, checkpoint_path: Any) -> None:
        ckpt = getattr(checkpoint_path, "checkpoint", None)
        if ckpt is not None and not _on_storage(ckpt):
            log.warning("Tune's checkpoint %s is gone from storage; the trial resumes from its "
                        "own newest commit", ckpt.path)  # fmt: skip
            return
        super().restore(checkpoint_path)  # type: ignore[misc]


def _on_storage(ckpt: Any) -> bool:
    import pyarrow.fs

    return ckpt.filesystem.get_file_info(ckpt.path).type != pyarrow.fs.FileType.NotFound


def _trial_run(job: SearchJob, key: str, cfg: Config, point: dict[str, Any]) -> ChildRun:
    """The trial's MLflow child run: created on the first attempt, continued afterwards."""
    params = allowed_params({"search": config_to_dict(cfg.search)})
    params |= allowed_params({"constraint": config_to_dict(cfg.constraint)})
    tags = {"rarn.trial_overrides": json.dumps(point, sort_keys=True)}
    if VARIANT in point:  # study mode: the variant's name (pipeline.trials)
        tags["rarn.variant"] = str(point[VARIANT])
    return job.tracking.child_run("search", key, params=params, tags=tags)


def _log_genotype(run: ChildRun, path: Path, result: SearchResult | None = None) -> None:
    """The current genotype as a sha256-recorded artifact (when it changed); with the final
    ``result``: all decodings, the final moments, and the run ends FINISHED."""
    if result is not None:
        atomic_write(path, result.genotype.to_json())  # never seen half-written
    sha = Genotype.from_json(path.read_text()).sha256()
    if run.tracking.client().get_run(run.run_id).data.tags.get("rarn.genotype_sha") != sha:
        run.log_artifact_checked(path)
        run.set_tags({"rarn.genotype_sha": sha})
    if result is None:
        return
    decodings = {m: g.sha256()[:12] for m, g in result.genotypes.items()}
    collapse = {"rarn.collapsed": str(bool(result.collapsed))}
    if result.collapsed:  # the detector's verdict on the final genotype (rarn.nas.collapse)
        collapse["rarn.collapse_reason"] = result.collapse_reason or ""
    run.set_tags({"rarn.genotypes": json.dumps(decodings)} | collapse)
    # every decoding (magnitude and perturbation) and its collapse signals, as one artifact
    run.tracking.client().log_dict(run.run_id, _decodings(result), "decodings.json")
    final = result.final
    keys = ("mu_F", "sigma_F", "log_lambda_faithful", "val_pgd_acc")
    moments = {f"final_{k}": final[k] for k in keys if k in final}
    run.log_metrics(moments, step=int(final.get("epoch", 0)))
    run.end("FINISHED")


# ----------------------------------------------------------------------------------------------
# The Tuner


def experiment_name(job: SearchJob) -> str:
    """``search-<parent run id>``: a second pipeline run into the same storage path gets its own
    Tune experiment (``--resume`` keeps the parent run, so it finds the same one again)."""
    run_id = job.tracking.parent_run_id
    return f"{EXPERIMENT}-{run_id[:12]}" if run_id else EXPERIMENT


def build_tuner(
    cfg: Config,
    data: SearchData,
    job: SearchJob,
    *,
    storage_path: str,
    points: Sequence[Mapping[str, Any]] | None = None,
    resume: bool = False,
    verbose: int = 1,
) -> tune.Tuner:
    """A fresh ``Tuner``, or ``Tuner.restore`` of the experiment under ``storage_path``.

    Args:
        cfg: the resolved config (its ``tune`` section sets resources and selection).
        data: the search split, put once into the object store by ``tune.with_parameters``.
        job: base config, tracking handle and run folder for every trial.
        storage_path: absolute folder or URI of Tune's experiment storage.
        points: explicit trial points (default: :func:`trial_points`).
        resume: restore the experiment when it can be restored.
        verbose: Tune's verbosity (0 silent, 1 status table, 2 every result).
    """
    t = cfg.tune
    fn = tune.with_parameters(search_trainable, data=data, job=job)
    fn.__mixins__ = (LocalCommitFallback,)  # before with_resources, which may wrap fn
    trainable = tune.with_resources(fn, {"cpu": t.cpus_per_trial, "gpu": t.gpus_per_trial})
    name = experiment_name(job)
    path = join_storage(storage_path, name)  # a URI's ?query stays at the end
    if resume and tune.Tuner.can_restore(path):
        # Finished trials stay finished; errored ones (divergence, corrupted checkpoint) too.
        return tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=False
        )
    scheduler = FIFOScheduler()
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.search.epochs,
            grace_period=t.grace_period,
            reduction_factor=2,
        )
    elif t.scheduler != "none":
        raise ConfigError(f"tune.scheduler {t.scheduler!r}: use none | asha")
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(points or trial_points(cfg)))},
        tune_config=tune.TuneConfig(
            metric=t.select_metric,
            mode=t.select_mode,
            scheduler=scheduler,
            max_concurrent_trials=t.max_concurrent or None,
            trial_dirname_creator=_trial_dirname,  # the key: see collect_outcomes
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            # num_to_keep=1 also forces an experiment snapshot after every trial checkpoint,
            # so a SIGKILLed driver restores trials from their latest epoch (ENV.md §6).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def fit(tuner: tune.Tuner) -> tuple[Any, bool]:
    """``tuner.fit()``; returns ``(results, interrupted)``.

    On SIGINT Tune stops, saves its state and returns normally, marking running trials
    TERMINATED in memory (RUNNING in the saved state, so ``Tuner.restore`` resumes them). Its
    handler puts the previous SIGINT handler back only when a signal arrived, which is how the
    interruption is detected here; afterwards the previous handler is always restored (Tune
    leaves its own installed, which would swallow a later Ctrl-C).
    """
    main = threading.current_thread() is threading.main_thread()
    watching = main and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    previous = signal.getsignal(signal.SIGINT) if main else None

    def marker(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if watching:
        signal.signal(signal.SIGINT, marker)
    try:
        results = tuner.fit()
        return results, watching and signal.getsignal(signal.SIGINT) is marker
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# Outcomes and selection


def _trial_dirname(trial: Any) -> str:
    """A trial's folder in Tune's storage is named by its key (``t00``, ...)."""
    return str(trial.config["trial"]["key"])


def _trial_key(result: Any) -> str:
    """The key of a ``Result``: from its config, else its folder's name (a trial that errored
    before its first report has no config in its result)."""
    config = result.config or {}
    return config["trial"]["key"] if "trial" in config else PurePosixPath(result.path).name


def _trial_status(result: Any) -> str:
    """``ERROR``, ``TERMINATED`` (finished or stopped by the scheduler: Tune marks its last
    result ``done``) or ``UNFINISHED`` (interrupted)."""
    if result.error is not None:
        return "ERROR"
    return "TERMINATED" if (result.metrics or {}).get("done") else "UNFINISHED"


def _trial_overrides(result: Any, run: Any) -> dict[str, Any]:
    """The trial's point: from its config, else from its MLflow run's ``rarn.trial_overrides``."""
    config = result.config or {}
    if "trial" in config:
        return {k: v for k, v in config["trial"].items() if k != "key"}
    tag = run.data.tags.get("rarn.trial_overrides") if run is not None else None
    return json.loads(tag) if tag else {}


def collect_outcomes(results: Any, cfg: Config, tracking: Tracking) -> list[TrialOutcome]:
    """Turn a ``ResultGrid`` into outcomes; close trial runs that Tune ended for them.

    Early-stopped (ASHA) and errored trials may never reach their own ``end()``; their MLflow
    runs are closed here (FINISHED or FAILED). Interrupted trials stay open until resumed.
    """
    client = tracking.client()
    out = []
    for result in sorted(results, key=_trial_key):
        key, status = _trial_key(result), _trial_status(result)
        run_id = tracking.find_child("search", key)
        run = client.get_run(run_id) if run_id else None
        point = _trial_overrides(result, run)
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if _is_number(v)}
        epochs = with_overrides(cfg, point).search.epochs
        o = TrialOutcome(key, point, status, metrics, metrics.get("epoch", 0) >= epochs)
        o.search_run_id = run_id
        if status == "ERROR":
            text = str(result.error).strip()
            o.error = text.splitlines()[-1] if text else "error"
        if run is not None:
            if run.info.status == "RUNNING" and status in ("TERMINATED", "ERROR"):
                client.set_terminated(run_id, status="FAILED" if status == "ERROR" else "FINISHED")
            if status == "TERMINATED":
                o.genotype_sha = run.data.tags.get("rarn.genotype_sha")
        out.append(o)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def select_top_k(outcomes: Sequence[TrialOutcome], k: int, metric: str, mode: str) -> list[str]:
    """Keys of the best ``k`` finished trials by their last ``metric``; errored ones skipped.

    Trials that ran all their epochs rank before early-stopped ones.
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"tune.select_mode {mode!r}: use max | min")
    ok = [o for o in outcomes if o.status == "TERMINATED" and o.genotype_sha]
    ok = [o for o in ok if metric in o.metrics]
    sign = 1.0 if mode == "max" else -1.0
    ok.sort(key=lambda o: (o.complete, sign * o.metrics[metric]), reverse=True)
    return [o.key for o in ok[:k]]


def load_genotypes(outcomes: Sequence[TrialOutcome], keys: Sequence[str], tracking: Tracking,
                   tmp: Path) -> None:  # fmt: skip
    """Fetch the selected trials' genotype artifacts, sha256-checked, into their outcomes."""
    by_key = {o.key: o for o in outcomes}
    for key in keys:
        o = by_key[key]
        path = download_checked(tracking, o.search_run_id, "genotype.json", tmp / key)
        g = Genotype.from_json(path.read_text())
        if g.sha256() != o.genotype_sha:
            raise RuntimeError(f"trial {key}: genotype sha256 differs from rarn.genotype_sha")
        o.genotype = g


def _decodings(result: SearchResult) -> dict:
    """``{rule: {genotype, collapsed, reason, param_free_share}}`` of every decoding."""
    out = {}
    for mode, g in result.genotypes.items():
        r = result.reports.get(mode)
        out[mode] = {"genotype": g.to_dict(), "sha256": g.sha256()}
        if r is not None:
            out[mode] |= {"collapsed": r.collapsed, "reason": r.reason, **r.metrics()}
    return out
