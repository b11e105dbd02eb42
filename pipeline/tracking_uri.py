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

from pipeline.env import env_seconds
from rarn.config import TrackingConfig

__all__ = [
    "SCHEMES",
    "TrackingUnavailable",
    "check_reachable",
    "probe_timeout",
    "redact_uri",
    "resolve_tracking_uri",
]

# Tracking-store schemes MLflow serves (a database scheme may name a driver: postgresql+psycopg).
SCHEMES = frozenset({"sqlite", "http", "https", "databricks", "databricks-uc", "uc",
                     "postgresql", "mysql", "mssql"})  # fmt: skip


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached (raised before any trial starts)."""


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
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"tracking URI {redact_uri(uri)!r}: unknown scheme {scheme!r}; use one of "
            f"{', '.join(sorted(SCHEMES))} (e.g. http://HOST:5000 or sqlite:///ABS/mlflow.db)"
        )
    return uri


def redact_uri(uri: str) -> str:
    """``uri`` without ``user:password@`` (safe to print and log)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{netloc}"))
    return uri


def _auth_headers(uri: str) -> dict[str, str]:
    """The credentials MLflow's client would send (token, user/password, or in the URI)."""
    parts = urllib.parse.urlsplit(uri)
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or parts.username
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password
    if user is None:
        return {}
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are answered, not followed: urllib would resend the credentials to wherever
    the server points (MLflow's client is told the same by ``MLFLOW_ALLOW_HTTP_REDIRECTS``)."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def probe_timeout() -> float:
    """Seconds each probe request may take: ``$RARN_TRACKING_TIMEOUT_S`` (default 5)."""
    return env_seconds("RARN_TRACKING_TIMEOUT_S", "5")


def _get(uri: str, path: str, timeout: float) -> int:
    """HTTP status of ``GET <uri>/<path>`` with MLflow's credentials (credentials in the URI
    travel as a header, not in the URL); a redirect is returned as its status, not followed."""
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    base = urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
    request = urllib.request.Request(f"{base}/{path}", headers=_auth_headers(uri))
    try:
        with _OPENER.open(request, timeout=timeout) as r:  # http(s) only
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def check_reachable(uri: str, timeout: float | None = None) -> None:
    """Fail fast when an http(s) tracking server does not answer, or refuses our credentials.

    MLflow's own client retries with back-off for minutes; this probe answers in seconds
    (``timeout`` per request, default :func:`probe_timeout`). It asks ``/health``, then lists
    one experiment (a read that needs the credentials): a server whose API fails (HTTP 5xx)
    behind a healthy ``/health`` is refused here too, and a redirect is not followed.

    Raises:
        TrackingUnavailable: connection refused, timeout, a non-200 answer, a redirect, or
            HTTP 401/403.
    """
    if not uri.startswith(("http://", "https://")):
        return
    timeout = probe_timeout() if timeout is None else timeout
    shown = redact_uri(uri)
    try:
        status, what = _get(uri, "health", timeout), "/health"
        if status == 200:
            what = "its API (experiments/search)"
            status = _get(uri, "api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailable(
            f"tracking server {shown} is unreachable ({reason}); start it or set "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None
    if status in (401, 403):
        raise TrackingUnavailable(
            f"tracking server {shown} refused the credentials (HTTP {status}); set "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if 300 <= status < 400:
        raise TrackingUnavailable(
            f"tracking server {shown}: {what} answered a redirect (HTTP {status}); not "
            "followed (the credentials would go elsewhere): set the final URI"
        )
    if status != 200:
        raise TrackingUnavailable(f"tracking server {shown}: {what} answered HTTP {status}")
