"""Cluster use: ``ray job submit`` against a loopback head, tracking to a loopback MLflow server.

Starts an MLflow tracking server (``mlflow server --host 127.0.0.1``) and a Ray head
(``ray start --head --block`` on 127.0.0.1, free ports, its own temp dir, the server's URI in
its environment, as a cluster's nodes would have it), submits exactly
``ray job submit --working-dir . -- python pipeline/run.py --config configs/smoke.yaml`` from a
copy of the project, and checks the registered model and its lineage on the server. Only the
processes this test started are stopped, by their recorded PIDs (never ``ray stop``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.env import env_defaults
from pipeline.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() - t0 < timeout, f"{url} not up after {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_ray_job_submit_with_mlflow_server(tmp_path, reaper):
    mlflow_port, gcs, dash, client_port, agent, agent_grpc, env_agent, metrics = _free_ports(8)
    uri = f"http://127.0.0.1:{mlflow_port}"
    env = {
        **os.environ,
        **env_defaults(),  # loopback and quiet, whatever the calling shell says
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` is this venv's
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        env=env, stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    reaper.track_tree(server.pid)
    temp_dir = Path(f"/tmp/rt{os.getpid()}")  # short: AF_UNIX socket paths <= 107 bytes
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
         "--metrics-export-port", str(metrics), "--temp-dir", str(temp_dir),
         "--disable-usage-stats"],
        env={**env, "MLFLOW_TRACKING_URI": uri},  # the cluster's tracking server
        stdout=open(logs / "ray.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_http(f"{uri}/health", server, 120)
        _wait_http(f"http://127.0.0.1:{dash}/api/version", head, 120)
        reaper.track_tree(head.pid)
        project = tmp_path / "project"  # what a user's checkout holds; no venv, runs or data
        for part in ("rarn", "pipeline", "configs"):
            shutil.copytree(
                ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__")
            )
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
             "--working-dir", ".", "--", "python", "pipeline/run.py", "--config",
             "configs/smoke.yaml", "--force-promote"],  # a chance-level model: flagged
            cwd=project, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        reaper.track_tree(head.pid)  # the job's workers too
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout and "models:/rarn-smoke@champion" in job.stdout

        client = Tracking(uri, "", "").client()
        mv = client.get_model_version_by_alias("rarn-smoke", "champion")
        retrain = client.get_run(mv.tags["rarn.retrain_run_id"])
        search = client.get_run(mv.tags["rarn.search_run_id"])
        assert retrain.data.tags["rarn.search_run_id"] == search.info.run_id
        assert retrain.data.tags["mlflow.parentRunId"] == mv.tags["rarn.parent_run_id"]
        assert search.info.status == retrain.info.status == "FINISHED"
        assert not list(temp_dir.rglob("mlflow.db"))  # the job never fell back to a local store
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        reaper.kill_all()  # whatever either left behind, by recorded PID
        shutil.rmtree(temp_dir, ignore_errors=True)
