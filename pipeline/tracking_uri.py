"""Where the pipeline tracks: an absolute tracking URI, safe to print, checked to answer.

Resolved and probed by the driver before anything is written (a bad URI exits 2, an unreachable
server 3, in seconds rather than after MLflow's minutes of retries). This module imports
neither MLflow nor Ray, so the CLI's pre-flight checks stay fast.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rarn.config import TrackingConfig

__all__ = ["TrackingUnavailable", "check_reachable", "redact_uri", "resolve_tracking_uri"]


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached, or refuses the credentials (raised before any
    trial starts and before anything is written)."""


_API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # read-only, any user may call


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


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (environment only, never the config)."""
    env = os.environ
    if "MLFLOW_TRACKING_USERNAME" in env and "MLFLOW_TRACKING_PASSWORD" in env:
        pair = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _get(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    """HTTP status of a GET (an HTTP error is a status too)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 (http(s) only)
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an http(s) tracking server does not answer, or refuses our credentials.

    ``/health`` answers without credentials (MLflow's basic-auth app leaves it open), so a
    read-only API call (search one experiment) with the client's credentials follows it:
    401/403 there would otherwise surface as a traceback after Ray has started and the run
    directory is written. MLflow's own client retries with back-off for minutes; this probe
    answers in seconds.

    Raises:
        TrackingUnavailable: connection refused, timeout, a non-200 ``/health``, or an API call
            refused with 401/403 (or failing with 5xx).
    """
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    try:
        status = _get(base + "/health", timeout)
        if status != 200:
            raise TrackingUnavailable(f"tracking server {redact_uri(uri)}: HTTP {status}")
        status = _get(base + _API_PROBE, timeout, _auth_headers())
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"tracking server {redact_uri(uri)} is unreachable ({reason}); start it or set "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None
    if status in (401, 403):
        raise TrackingUnavailable(
            f"tracking server {redact_uri(uri)} refused the credentials (HTTP {status} on "
            f"{_API_PROBE.split('?')[0]}): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a user who may use it"
        )
    if status >= 500:
        raise TrackingUnavailable(f"tracking server {redact_uri(uri)}: HTTP {status} on its API")
