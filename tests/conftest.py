"""Shared fixtures. Ray's environment must be set before ``ray`` is imported (ENV.md §9)."""

from __future__ import annotations

import os

for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP 127.0.0.1: every listener on loopback
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_AIR_NEW_OUTPUT": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_k, _v)  # workers inherit the driver's environment

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """One 2-CPU Ray instance on loopback for the whole test session."""
    import logging

    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()
