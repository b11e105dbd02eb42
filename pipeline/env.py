"""Environment defaults for Ray and MLflow: quiet, and loopback-only for a Ray we start ourselves.

Ray reads these variables when it is imported and started, and its workers inherit the driver's
environment, so :func:`apply_env_defaults` must run before anything imports ``ray``: the CLI
calls it first thing in ``main``, ``tests/conftest.py`` and the benchmarks before their imports.
Every value is a default (``os.environ.setdefault``): what the user exported wins. The reasons
for each value are in ENV.md §4 and §9.

This module imports nothing beyond the standard library.
"""

from __future__ import annotations

import os

__all__ = [
    "LOOPBACK",
    "QUIET",
    "TESTING",
    "TRACKING",
    "apply_env_defaults",
    "env_defaults",
    "env_seconds",
]

# Always: MLflow's HTTP client bounded (its defaults retry for minutes) and never following a
# redirect with the credentials; the user's exported values win (configurable).
TRACKING: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ALLOW_HTTP_REDIRECTS": "false",
}
# Always: no usage statistics, no telemetry, no checkpoint-sync warnings from frequent commits.
QUIET: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    **TRACKING,
}
# Only for a Ray instance of our own (not when joining $RAY_ADDRESS, where the cluster decides):
# node IP 127.0.0.1 so every listener binds to loopback, and no token auth on loopback.
LOOPBACK: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}
# Tests and benchmarks: plain Tune output (no config box at verbose=0), faster Ray Train reports.
TESTING: dict[str, str] = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def env_defaults(*, connect: bool = False, testing: bool = False) -> dict[str, str]:
    """The defaults for a driver that joins a cluster (``connect``) or starts its own Ray."""
    return {**QUIET, **({} if connect else LOOPBACK), **(TESTING if testing else {})}


def apply_env_defaults(*, connect: bool = False, testing: bool = False) -> dict[str, str]:
    """``os.environ.setdefault`` every value of :func:`env_defaults`; call before ``import ray``.

    Args:
        connect: the driver joins an existing cluster (``$RAY_ADDRESS``): its own settings
            (auth mode, node addresses) are left alone.
        testing: also the test-suite and benchmark settings (:data:`TESTING`).

    Returns:
        The variables this call set (those the environment did not have yet).
    """
    applied = {}
    for key, value in env_defaults(connect=connect, testing=testing).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def env_seconds(name: str, default: str) -> float:
    """A timeout from the environment variable ``name`` (``default`` when unset), in seconds.

    Raises:
        ValueError: not a number in (0, 3600] (the message names the variable).
    """
    text = os.environ.get(name, default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ValueError(f"{name}={text!r}: expected seconds in (0, 3600]")
    return value
