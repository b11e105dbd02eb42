"""MLflow lineage for the pipeline: one parent run, child runs per search trial and retraining.

Runs are addressed by explicit ids through ``MlflowClient`` objects made here (the picklable
:class:`Tracking` handle's ``client()``), so the driver, Tune trials and Ray Train workers can
all log without the fluent API's process-global state. The driver
resolves an *absolute* tracking URI and checks that it answers (:mod:`pipeline.tracking_uri`),
then :func:`prepare_tracking` creates the database, the experiment (absolute artifact location)
and the parent run before any trial starts. Models are logged and loaded by
:mod:`pipeline.model_store`.

Lineage is data (STYLE principle 11):

* parent run: allow-listed config params, ``config.yaml`` (credentials redacted), tags
  ``rarn.data_fingerprint`` (sha256) and ``rarn.code_version`` (git sha);
* search trial run (``mlflow.parentRunId`` = parent): its params, per-epoch metrics,
  ``genotype.json`` with ``rarn.genotype_sha``; a resumed trial continues its own run
  (found again by its tag ``rarn.key``);
* retraining run: tags ``rarn.search_run_id`` and ``rarn.genotype_sha`` pointing back, the model,
  evaluation results and plots;
* registered model version with alias ``champion`` and tags pointing to both runs.

The sha256 of every artifact that is later loaded (genotypes, models, result tables) is recorded
as a tag when it is logged (``rarn.sha256.<path>``, ``rarn.model_sha256``) and checked before it
is loaded (:func:`download_checked`, :func:`pipeline.model_store.load_model_checked`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.tracking_uri import redact_uri
from rarn.checkpoint import file_sha256
from rarn.config import Config, config_to_dict, dump_config

__all__ = [
    "PARAM_EXCLUDE",
    "PARAM_SECTIONS",
    "ArtifactIntegrityError",
    "ChildRun",
    "Tracking",
    "allowed_params",
    "close_open_children",
    "code_version",
    "download_checked",
    "end_pipeline_run",
    "log_stage_times",
    "prepare_tracking",
]

log = logging.getLogger(__name__)

# Only these config sections become MLflow params, minus paths/URIs (no credentials ever).
PARAM_SECTIONS: tuple[str, ...] = ("data", "search", "constraint", "retrain", "evaluation", "tune")
PARAM_EXCLUDE: frozenset[str] = frozenset({"data.root", "data.path", "tune.storage_path"})
_MAX_PARAM = 500  # MLflow's limit is larger; long values are truncated, never dropped silently
COMMIT_TAG = "rarn.commit_sha256"  # sha256 of the trial's progress.json files, newest first
_COMMITS_KEPT = 16  # Ray's copy may lag the local commit by a few epochs after a SIGKILL


class ArtifactIntegrityError(RuntimeError):
    """An artifact's sha256 differs from the one recorded when it was logged."""


# ----------------------------------------------------------------------------------------------
# Lineage values: code version, allow-listed params


def code_version(root: str | Path | None = None) -> str:
    """``$RARN_CODE_VERSION``, else the git sha of the checkout (``+dirty``), else ``unknown``."""
    if os.environ.get("RARN_CODE_VERSION"):
        return os.environ["RARN_CODE_VERSION"]
    root = Path(root or Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def allowed_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a config dict to dotted params, keeping only the allow-listed sections/fields."""
    out: dict[str, str] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "tune.param_space":
            out.update(allowed_params(v, key + "."))
            continue
        section = key.split(".", 1)[0]
        if section not in PARAM_SECTIONS or key in PARAM_EXCLUDE or "." not in key:
            continue
        text = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else str(v)
        out[key] = text[:_MAX_PARAM]
    return out


# ----------------------------------------------------------------------------------------------
# The picklable handle every trial and trainer receives


def _q(value: str) -> str:
    return value.replace("'", "")


@dataclass(frozen=True)
class Tracking:
    """Where to log (absolute URI), in which experiment, under which parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def find_child(self, role: str, key: str) -> str | None:
        """Run id of this parent's child with ``rarn.role`` = role and ``rarn.key`` = key."""
        runs = self.client().search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{_q(self.parent_run_id)}' and "
                f"tags.`rarn.role` = '{_q(role)}' and tags.`rarn.key` = '{_q(key)}'"
            ),
            max_results=5,
        )
        return runs[0].info.run_id if runs else None

    def children(self, role: str | None = None) -> list[Any]:
        """All child runs of the parent (optionally of one role)."""
        f = f"tags.`mlflow.parentRunId` = '{_q(self.parent_run_id)}'"
        if role:
            f += f" and tags.`rarn.role` = '{_q(role)}'"
        return self.client().search_runs([self.experiment_id], filter_string=f, max_results=1000)

    def child_run(
        self,
        role: str,
        key: str,
        *,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> ChildRun:
        """Create the child run, or continue it when it exists (a resumed trial or trainer)."""
        client = self.client()
        run_id = self.find_child(role, key)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return ChildRun(self, run_id, continued=True)
        base = {"mlflow.parentRunId": self.parent_run_id, "rarn.role": role, "rarn.key": key}
        run = client.create_run(
            self.experiment_id, tags={**base, **(tags or {})}, run_name=f"{role}-{key}"
        )
        child = ChildRun(self, run.info.run_id)
        if params:
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return child


@dataclass(frozen=True)
class ChildRun:
    """A child run addressed by id; every method is one MLflow call."""

    tracking: Tracking
    run_id: str
    continued: bool = False  # the run existed (a retried or restored trial)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if batch:
            self.tracking.client().log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracking.client().log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]
        )

    def resumed(self, progress: Mapping[str, Any] | None) -> int:
        """Record a resume; log the resumed epoch's metrics if the kill beat their logging.

        Returns:
            The epoch resumed from (0: a fresh start).
        """
        if not progress:
            return 0
        epoch = int(progress["epoch"])
        self.set_tags({"rarn.resumed_from_epoch": epoch})
        history = self.tracking.client().get_metric_history(self.run_id, "epoch")
        if epoch not in {m.step for m in history}:
            self.log_metrics(progress.get("metrics", {}), step=epoch)
        return epoch

    def commit_digests(self) -> list[str]:
        """The checkpoint commits this run recorded (:func:`pipeline.checkpoints.commit_digest`,
        newest first): a trial resumes only from one of them."""
        tag = self.tracking.client().get_run(self.run_id).data.tags.get(COMMIT_TAG, "")
        return [d for d in tag.split(",") if d]

    def record_commit(self, digests: list[str], digest: str) -> list[str]:
        """Record a new commit's digest (the last :data:`_COMMITS_KEPT` are kept); returns the
        new list."""
        kept = [digest, *(d for d in digests if d != digest)][:_COMMITS_KEPT]
        self.set_tags({COMMIT_TAG: ",".join(kept)})
        return kept

    def log_artifact_checked(self, local_path: str | Path, artifact_dir: str | None = None) -> str:
        """Log a file and record its sha256 as ``rarn.sha256.<artifact path>``."""
        local_path = Path(local_path)
        digest = file_sha256(local_path)
        rel = f"{artifact_dir}/{local_path.name}" if artifact_dir else local_path.name
        client = self.tracking.client()
        client.set_tag(self.run_id, f"rarn.sha256.{rel}", digest)
        client.log_artifact(self.run_id, str(local_path), artifact_dir)
        return digest

    def end(self, status: str = "FINISHED") -> None:
        self.tracking.client().set_terminated(self.run_id, status=status)

    @contextlib.contextmanager
    def failing_on_error(self) -> Iterator[ChildRun]:
        """End the run FAILED (with the error as a tag) when the block raises, then re-raise.

        ``SystemExit`` / ``KeyboardInterrupt`` (Ray stopping the actor: ASHA, an interrupted
        experiment) leave the run open; the driver closes it as FINISHED or KILLED.
        """
        try:
            yield self
        except Exception as e:
            with contextlib.suppress(Exception):
                self.set_tags({"rarn.error": f"{type(e).__name__}: {e}"[:4000]})
                self.end("FAILED")
            raise


# ----------------------------------------------------------------------------------------------
# Driver side: database, experiment, parent run


def prepare_tracking(
    cfg: Config,
    *,
    uri: str,
    run_dir: Path,
    fingerprint: str,
    parent_run_id: str | None = None,
) -> Tracking:
    """Create (or reopen) the experiment and the parent run, and log the run's lineage.

    Called by the driver before any trial starts: the first access creates the sqlite schema,
    so concurrent trials never race the migration (ENV.md §8).
    """
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = cfg.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database, absolute
            db = Path(uri[len("sqlite:///") :])
            location = (db.parent / "mlruns" / name).as_uri()
        exp_id = client.create_experiment(name, artifact_location=location)
    else:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    if parent_run_id is not None:
        client.update_run(parent_run_id, status="RUNNING")
        return Tracking(uri, exp_id, parent_run_id)
    run = client.create_run(
        exp_id,
        run_name=f"pipeline-{run_dir.name}",
        tags={
            "rarn.role": "pipeline",
            "rarn.run_dir": str(run_dir),
            "rarn.data_fingerprint": fingerprint,
            "rarn.code_version": code_version(),
            "rarn.registered_model": cfg.tracking.registered_model,
        },
    )
    rid = run.info.run_id
    params = allowed_params(config_to_dict(cfg))
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(rid, params=items[i : i + 100])
    with tempfile.TemporaryDirectory() as d:
        safe = dataclasses.replace(cfg.tracking, tracking_uri=redact_uri(cfg.tracking.tracking_uri))
        text = dump_config(dataclasses.replace(cfg, tracking=safe))
        path = Path(d) / "config.yaml"
        path.write_text(text)
        client.set_tag(rid, "rarn.sha256.config.yaml", file_sha256(path))
        client.log_artifact(rid, str(path))
    return Tracking(uri, exp_id, rid)


def close_open_children(tracking: Tracking, status: str) -> int:
    """Set every RUNNING child of the parent to ``status``; returns how many were closed."""
    n = 0
    client = tracking.client()
    for run in tracking.children():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
            n += 1
    return n


def log_stage_times(tracking: Tracking, times: Mapping[str, float]) -> None:
    """Wall seconds per stage as parent-run metrics ``time_<stage>_s`` (e.g. ``time_search_s``,
    ``time_total_s``). A resumed run logs the stages it ran this time (a skipped one: ~0 s)."""
    now = int(time.time() * 1000)
    batch = [Metric(f"time_{k}_s", round(float(v), 3), now, 0) for k, v in times.items()]
    if batch:
        tracking.client().log_batch(tracking.parent_run_id, metrics=batch)


def end_pipeline_run(tracking: Tracking, status: str = "FINISHED") -> None:
    """End the parent run with ``status``; unless FINISHED, first end every child still RUNNING
    with the same status (KILLED on an interrupt, FAILED on an error)."""
    if status != "FINISHED":
        close_open_children(tracking, status)
    tracking.client().set_terminated(tracking.parent_run_id, status)


# ----------------------------------------------------------------------------------------------
# Checked artifacts


def download_checked(tracking: Tracking, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download ``artifact_path`` of a run and verify it against ``rarn.sha256.<path>``.

    Raises:
        ArtifactIntegrityError: no recorded digest, or a different one.
    """
    client = tracking.client()
    recorded = client.get_run(run_id).data.tags.get(f"rarn.sha256.{artifact_path}")
    if not recorded:
        raise ArtifactIntegrityError(f"run {run_id}: no sha256 recorded for {artifact_path!r}")
    local = Path(client.download_artifacts(run_id, artifact_path, str(dst)))
    digest = file_sha256(local)
    if digest != recorded:
        raise ArtifactIntegrityError(
            f"run {run_id}: {artifact_path} has sha256 {digest}, recorded {recorded}"
        )
    return local
