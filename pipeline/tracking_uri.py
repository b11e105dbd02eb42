"""Where the pipeline tracks: an absolute tracking URI, safe to print, checked to answer.

Resolved and probed by the driver before anything is written (a bad URI exits 2, an unreachable
server 3, in seconds rather than after MLflow's minutes of retries). This module imports
neither MLflow nor Ray, so the CLI's pre-flight checks stay fast.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rarn.config import TrackingConfig

__all__ = ["TrackingUnavailable", "check_reachable", "redact_uri", "resolve_tracking_uri"]


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
