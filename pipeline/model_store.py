"""Models in MLflow: a portable pyfunc, logged with the sha256 of its files, checked before load.

:func:`log_model_checked` logs a retrained network as an MLflow pyfunc built by
:mod:`pipeline.portable`: ``weights.pt`` (a state_dict), ``genotype.json`` and ``network.json``
as ``artifacts`` (a named network, e.g. ``resnet18``: ``weights.pt`` and ``network.json``), the
``rarn`` package as ``code_paths``, :mod:`pipeline.portable` as the model code, a tensor
signature and an input example. Plain MLflow loads it without this repository and
without unpickling anything. The digest of every file (:func:`dir_sha256`, read back from the
store) is recorded as ``rarn.model_sha256``.

:func:`load_model_checked` is our own loader: it downloads the files, recomputes the digest,
refuses files that differ, and only then rebuilds the network from the three plain files
(:func:`pipeline.portable.load_network`); the model's code files are never run.
:func:`register_version` and :func:`set_alias` are the registry side; which version gets the
alias is decided by :mod:`pipeline.promotion`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

import rarn
from pipeline.tracking import ArtifactIntegrityError, Tracking
from rarn.checkpoint import file_sha256

__all__ = [
    "current_alias_version",
    "dir_sha256",
    "load_model_checked",
    "log_model_checked",
    "register_version",
    "set_alias",
]

_RARN = Path(rarn.__file__).resolve().parent  # travels with the model (code_paths)
_MODEL_CODE = Path(__file__).resolve().with_name("portable.py")


def dir_sha256(root: str | Path) -> str:
    """sha256 over ``relative path + file sha256`` of every file under ``root``, sorted.

    Bytecode caches are left out: a model's ``code/`` folder may gain them on any load.
    """
    root = Path(root)
    h = hashlib.sha256()
    files = (q for q in root.rglob("*") if q.is_file() and "__pycache__" not in q.parts)
    for p in sorted(files):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _requirements(network: str) -> list[str]:
    """Exact versions of what loading needs: torch, mlflow, numpy (and torchvision, whose
    models the named networks are built from)."""
    import mlflow
    import numpy
    import torch

    out = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
           f"numpy=={numpy.__version__}"]  # fmt: skip
    if network:
        import torchvision

        out.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    return out


def log_model_checked(
    tracking: Tracking, run_id: str, model: Any, example: Any, *, network: str = ""
) -> tuple[str, str]:
    """Log ``model`` as a portable pyfunc to ``run_id``; returns ``(model_uri, sha256)``.

    Args:
        tracking: where to log.
        run_id: the retraining run.
        model: a :class:`rarn.models.darts.Network` (CPU, eval mode), or the named network
            ``network``.
        example: an input batch ``(B, C, H, W)`` (the input example and the signature's shape).
        network: a :data:`rarn.models.baselines.BASELINES` name when ``model`` is that network.

    The digest (:func:`dir_sha256` of the logged model directory, read back from the store) is
    recorded as ``rarn.model_sha256`` and checked by :func:`load_model_checked`. Uses the
    fluent API (``log_model`` needs an active run), so call it in a worker process.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline.portable import save_network

    x = np.ascontiguousarray(torch.as_tensor(example).detach().cpu().float().numpy())
    with torch.inference_mode():
        logits = model(torch.from_numpy(x)).numpy()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *x.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, logits.shape[1]))]),
    )
    with (
        process_tracking_uri(tracking.uri),
        tempfile.TemporaryDirectory() as d,
        mlflow.start_run(run_id=run_id, experiment_id=tracking.experiment_id),
    ):
        files = save_network(model, d, torch.from_numpy(x), network=network)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_MODEL_CODE),
            artifacts={k: str(p) for k, p in files.items()},
            code_paths=[str(_RARN)],
            signature=signature,
            input_example=x,
            pip_requirements=_requirements(network),
        )
        digest = dir_sha256(_download_model(tracking, info.model_uri, str(Path(d) / "back")))
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
    """Download a logged model, verify its digest, then rebuild the network (CPU, eval mode).

    Nothing is loaded before the digest matched, and then only the plain files are read
    (:func:`pipeline.portable.load_network`): the model's code files are not run.

    Raises:
        ArtifactIntegrityError: the downloaded files differ from what was logged.
    """
    from pipeline.portable import FILES, load_network

    with tempfile.TemporaryDirectory() as d:
        local = Path(_download_model(tracking, model_uri, d))
        digest = dir_sha256(local)
        if digest != expected_sha256:
            raise ArtifactIntegrityError(
                f"{model_uri}: model files have sha256 {digest}, recorded {expected_sha256}; "
                "refusing to load them"
            )
        return load_network({k: local / "artifacts" / f for k, f in FILES.items()})


# ----------------------------------------------------------------------------------------------
# The registry


def register_version(tracking: Tracking, name: str, model_uri: str, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name`` (no alias); returns the version."""
    client = tracking.client()
    try:
        client.create_registered_model(name, description="RACL robust architectures (rarn)")
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise

    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    # MLflow's registry looks the logged model up through the process-wide tracking URI, not the
    # client's: point it at this run's store for the call (another store may be set globally).
    with process_tracking_uri(tracking.uri):
        mv = client.create_model_version(
            name, source=model_uri, run_id=tags.get("rarn.retrain_run_id"), tags=dict(tags),
            model_id=model_id,
        )  # fmt: skip
    return str(mv.version)


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then restored from the
    environment as it was (``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``, so
    an unrestored call leaks this store into every later run of the process, ``--resume``'s
    checks included)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset, as it was


def current_alias_version(tracking: Tracking, name: str, alias: str) -> Any | None:
    """The version ``name@alias`` points at, or None (no such model or alias)."""
    client = tracking.client()
    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            return None
        raise
    return None if version is None else client.get_model_version(name, str(version))


def set_alias(tracking: Tracking, name: str, alias: str, version: str) -> None:
    tracking.client().set_registered_model_alias(name, alias, version)
