"""MLflow lineage for the pipeline: one parent run, child runs per search trial and retraining.

Every MLflow call of the project lives here, behind explicit run ids (``MlflowClient``), so the
driver, Tune trials and Ray Train workers can all log without the fluent API's process-global
state. The driver resolves an *absolute* tracking URI, checks that it is reachable, creates the
database and the experiment (absolute artifact location) and the parent run before any trial
starts, and hands a picklable :class:`Tracking` to every trial and trainer.

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
is loaded (:func:`download_checked`, :func:`load_model_checked`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rarn.checkpoint import file_sha256
from rarn.config import Config, TrackingConfig, config_to_dict, dump_config

__all__ = [
    "PARAM_EXCLUDE",
    "PARAM_SECTIONS",
    "ArtifactIntegrityError",
    "ChildRun",
    "Tracking",
    "TrackingUnavailable",
    "allowed_params",
    "check_reachable",
    "code_version",
    "dir_sha256",
    "download_checked",
    "file_sha256",
    "load_model_checked",
    "log_model_checked",
    "prepare_tracking",
    "redact_uri",
    "register_champion",
    "resolve_tracking_uri",
]

log = logging.getLogger(__name__)

# Only these config sections become MLflow params, minus paths/URIs (no credentials ever).
PARAM_SECTIONS: tuple[str, ...] = ("data", "search", "constraint", "retrain", "evaluation", "tune")
PARAM_EXCLUDE: frozenset[str] = frozenset({"data.root", "data.path", "tune.storage_path"})
_MAX_PARAM = 500  # MLflow's limit is larger; long values are truncated, never dropped silently


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached (raised before any trial starts)."""


class ArtifactIntegrityError(RuntimeError):
    """An artifact's sha256 differs from the one recorded when it was logged."""


# ----------------------------------------------------------------------------------------------
# URIs, reachability, hashes


def resolve_tracking_uri(cfg: TrackingConfig, cwd: str | Path | None = None) -> str:
    """Absolute tracking URI: config > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``.

    Relative sqlite paths and plain paths are made absolute against ``cwd``: Ray trials run in
    their own working directories, and ``mlflow ui`` must find the same database.
    """
    base = Path(cwd or os.getcwd()).resolve()
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):  # sqlite:///rel.db is relative; sqlite:////abs.db absolute
            return f"sqlite:///{(base / path).resolve()}"
        return uri
    if uri.startswith("file:"):
        raise ValueError(
            f"tracking URI {uri!r}: file stores break on clusters and with concurrent trials; "
            "use sqlite:///ABS/PATH/mlflow.db or an http(s) tracking server"
        )
    if "://" not in uri:  # a bare path: treat as an sqlite database file
        return f"sqlite:///{(base / uri).resolve()}"
    return uri


def redact_uri(uri: str) -> str:
    """``uri`` without ``user:password@`` (safe to print and log)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{netloc}"))
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server does not answer ``/health``.

    MLflow's own client retries with back-off for minutes; this probe answers in seconds.

    Raises:
        TrackingUnavailable: connection refused, timeout, or a non-200 answer.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http(s) only)
            if r.status != 200:
                raise TrackingUnavailable(f"tracking server {redact_uri(uri)}: HTTP {r.status}")
    except urllib.error.HTTPError as e:
        raise TrackingUnavailable(f"tracking server {redact_uri(uri)}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"tracking server {redact_uri(uri)} is unreachable ({reason}); start it or set "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


def dir_sha256(root: str | Path) -> str:
    """sha256 over ``relative path + file sha256`` of every file under ``root``, sorted."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


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


# ----------------------------------------------------------------------------------------------
# Checked artifacts and models


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


def log_model_checked(tracking: Tracking, run_id: str, model: Any) -> tuple[str, str]:
    """Log ``model`` (MLflow PyTorch flavour) to ``run_id``; returns ``(model_uri, sha256)``.

    The digest (:func:`dir_sha256` of the logged model directory, read back from the store) is
    recorded as ``rarn.model_sha256`` and checked by :func:`load_model_checked`. Uses the
    fluent API (``log_model`` needs an active run), so call it in a worker process.
    """
    import mlflow
    import torch

    mlflow.set_tracking_uri(tracking.uri)  # this worker process only
    torch_version = torch.__version__.split("+")[0]
    with mlflow.start_run(run_id=run_id, experiment_id=tracking.experiment_id):
        # Pickle keeps the full Network (cells, Lipschitz report); the sha256 check guards it.
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            pip_requirements=[f"torch=={torch_version}"],
            serialization_format="pickle",
        )
        with tempfile.TemporaryDirectory() as d:
            digest = dir_sha256(_download_model(tracking, info.model_uri, d))
        mlflow.set_tags({"rarn.model_uri": info.model_uri, "rarn.model_sha256": digest})
    return info.model_uri, digest


def _download_model(tracking: Tracking, model_uri: str, dst: str) -> str:
    """Download a logged model (``models:/m-<id>``) from *this* tracking store.

    ``download_artifacts`` resolves ``models:/`` URIs against the process-global tracking URI,
    so the logged model's artifact location is looked up here with an explicit client.
    """
    from mlflow.artifacts import download_artifacts

    location = model_uri
    if model_uri.startswith("models:/m-"):
        location = (
            tracking.client().get_logged_model(model_uri.removeprefix("models:/")).artifact_location
        )
    return download_artifacts(
        artifact_uri=location, dst_path=dst, tracking_uri=tracking.uri, registry_uri=tracking.uri
    )


def load_model_checked(tracking: Tracking, model_uri: str, expected_sha256: str) -> Any:
    """Download a logged model, verify its digest, then load it (CPU).

    Raises:
        ArtifactIntegrityError: the downloaded files differ from what was logged.
    """
    import mlflow.pytorch

    with tempfile.TemporaryDirectory() as d:
        local = _download_model(tracking, model_uri, d)
        digest = dir_sha256(local)
        if digest != expected_sha256:
            raise ArtifactIntegrityError(
                f"{model_uri}: model files have sha256 {digest}, recorded {expected_sha256}; "
                "refusing to unpickle them"
            )
        return mlflow.pytorch.load_model(local, map_location="cpu")


def register_champion(
    tracking: Tracking, name: str, alias: str, model_uri: str, tags: Mapping[str, str]
) -> str:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it.

    Returns:
        The version number (as a string).
    """
    client = tracking.client()
    try:
        client.create_registered_model(name, description="RACL robust architectures (rarn)")
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(
        name, source=model_uri, run_id=tags.get("rarn.retrain_run_id"), tags=dict(tags),
        model_id=model_id,
    )  # fmt: skip
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)
