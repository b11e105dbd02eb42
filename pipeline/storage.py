"""Where Ray Tune and Ray Train keep their state: one storage path, joined like a URI.

``tune.storage_path`` is a local folder (``<run_dir>/ray`` by default, or a shared filesystem
mounted on every node) or a URI (``s3://bucket/prefix?endpoint_override=http://host:9000``).
Sub-paths are joined onto the URI's *path*, keeping its query: with an f-string the experiment
name lands after the query (``...?endpoint_override=http/search``) and pyarrow rejects it. The
join is the one Ray's storage layer uses (``ray.air._internal.uri_utils.URI``; the unit tests
compare them), written here so the driver's pre-flight checks need not import Ray.

This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from pathlib import Path

from rarn.config import Config

__all__ = ["is_uri", "join_storage", "run_storage_path"]


def is_uri(path: str) -> bool:
    """True for a remote URI (``s3://``, ``gs://``, ...); plain paths and ``file://`` are local."""
    scheme = urllib.parse.urlsplit(path).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive, not a scheme


def join_storage(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended to its path (a URI's query and scheme are kept)."""
    u = urllib.parse.urlsplit(base)
    if not u.scheme or len(u.scheme) == 1:
        return str(Path(base, *parts))
    path = posixpath.normpath(posixpath.join(u.netloc + u.path, *parts))
    return urllib.parse.urlunsplit((u.scheme, path, "", u.query, u.fragment))


def run_storage_path(cfg: Config, run_dir: str | Path) -> str:
    """``tune.storage_path``, or ``<run_dir>/ray`` when it is empty."""
    return cfg.tune.storage_path or str(Path(run_dir) / "ray")
