"""Models in MLflow: logged with the sha256 of their files, checked before they are unpickled.

:func:`log_model_checked` logs a retrained network (MLflow PyTorch flavour, pickle format: it
keeps the whole network with its Lipschitz report) and records :func:`dir_sha256` of the files
as read back from the store (``rarn.model_sha256``); :func:`load_model_checked` downloads them,
recomputes the digest and refuses to unpickle files that differ. :func:`register_champion`
makes a logged model a registered version and points the alias (``champion``) at it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline.tracking import ArtifactIntegrityError, Tracking
from rarn.checkpoint import file_sha256

__all__ = ["dir_sha256", "load_model_checked", "log_model_checked", "register_champion"]


def dir_sha256(root: str | Path) -> str:
    """sha256 over ``relative path + file sha256`` of every file under ``root``, sorted."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


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
