"""Cluster use: ``ray job submit`` against a loopback head, tracking to a loopback MLflow server;
and the driver's safety on clusters (loopback listeners without the test env, SIGTERM, resources,
tracking credentials, URI joins, multi-node storage and tracking, unique Ray run names).

Starts an MLflow tracking server (``mlflow server --host 127.0.0.1``) and a Ray head
(``ray start --head --block`` on 127.0.0.1, free ports, its own temp dir, the server's URI in
its environment, as a cluster's nodes would have it), submits exactly
``ray job submit --working-dir . -- python pipeline/run.py --config configs/smoke.yaml`` from a
copy of the project, and checks the registered model and its lineage on the server. Only the
processes this test started are stopped, by their recorded PIDs (never ``ray stop``). That test
runs only where the three-node cluster of ``test_pipeline_multinode.py`` cannot be built: there
the same submitted job runs on three nodes with the same checks (CI time, issue 20).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from netns_cluster import single_node_fallback
from trial_files import committed_epoch

from pipeline.env import env_defaults
from pipeline.tracking import Tracking
from rarn.config import load_config

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
@single_node_fallback("the same submitted job (ray job submit, MLflow server, lineage)")
def test_ray_job_submit_with_mlflow_server(tmp_path, reaper):
    """Where network namespaces cannot be made (not root, no iproute2), the submitted smoke
    pipeline on a loopback head, retrained by two Ray Train workers; elsewhere the multinode
    module checks all of this and more."""
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
             "configs/smoke.yaml", "--force-promote",  # a chance-level model: flagged
             "tune.retrain_workers=2"],  # Ray Train (DDP over gloo), as on the three nodes
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


# ----------------------------------------------------------------------------------------------
# Safe by default (issue 10, item 2): each of these failed before the fix.

SMOKE = str(ROOT / "configs" / "smoke.yaml")
# 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net/tcp{,6} print them
_LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _listening(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state held by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes |= {ln[8:-1] for ln in links if ln.startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(cols[1].split(":")[0])
    return found


def _plain_env(tmp: Path) -> dict[str, str]:
    """The caller's environment without anything conftest or the Makefile set for Ray."""
    drop = set(env_defaults(testing=True)) | {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}


@pytest.mark.slow
def test_plain_driver_listens_on_loopback_and_stops_on_sigterm(tmp_path, reaper):
    """``python pipeline/run.py`` with none of the test env: every listener on loopback; a real
    SIGTERM (as ``ray job stop`` or Kubernetes send) ends it like Ctrl-C: exit 130, runs KILLED,
    Tune's state saved, the resume hint printed."""
    log = tmp_path / "driver.log"
    trials = "tune.param_space={search.epochs: [1, 16]}"  # t01 is still running at the signal
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "pipeline/run.py"), "--config", SMOKE, "--stages", "search",
         "--quiet", f"run_dir={tmp_path}/run", trials],
        cwd=tmp_path, env=_plain_env(tmp_path), stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    reaper.track_tree(p.pid)
    t01 = tmp_path / "run/search/trials/t01"
    t0 = time.monotonic()
    while committed_epoch(t01) < 1:
        assert p.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 240, "t01 never committed an epoch"
        time.sleep(0.2)
    listening = _listening(reaper.track_tree(p.pid))
    assert listening and listening <= _LOOPBACK, listening
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "interrupted; continue with:" in text and "--resume" in text
    assert "SIGTERM received" not in text and "*** " not in text  # no fatal-signal dump
    state = json.loads((tmp_path / "run/state.json").read_text())
    tracking = Tracking(f"sqlite:///{tmp_path}/mlflow.db", state["experiment_id"], "")
    client = tracking.client()
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
    runs = {
        r.data.tags["rarn.key"]: r.info.status
        for r in client.search_runs([state["experiment_id"]])
        if "rarn.key" in r.data.tags
    }
    assert runs["t01"] == "KILLED"  # fmt: skip
    tune_dirs = list((tmp_path / "run/ray").glob("search-*/tuner.pkl"))
    assert len(tune_dirs) == 1  # Tune saved its state for Tuner.restore


def test_too_few_cpus_is_an_error_before_any_trial(tmp_path):
    """``--num-cpus 1 tune.retrain_workers=2``: Ray would wait forever for the second worker;
    the driver says so and exits 2 before anything is written."""
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, str(ROOT / "pipeline/run.py"), "--config", SMOKE, "--num-cpus", "1",
         f"run_dir={tmp_path}/run", "tune.retrain_workers=2"],
        cwd=tmp_path, env=_plain_env(tmp_path), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "not enough resources" in p.stderr and "tune.retrain_workers" in p.stderr
    assert "needs 2 x (1 CPU)" in p.stderr and "1 CPU" in p.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == []  # no run_dir, no mlflow.db
    assert time.monotonic() - t0 < 120


class _Refusing(http.server.BaseHTTPRequestHandler):
    """An MLflow server with basic auth on: ``/health`` open, every API call 401."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        code = 200 if self.path == "/health" else 401
        self.send_response(code)
        if code == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.end_headers()
        self.wfile.write(b"OK" if code == 200 else b"You are not authenticated.")

    def log_message(self, *args: object) -> None:
        pass


def test_tracking_auth_failure_exits_3_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from pipeline.run import main

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        rc = main(["--config", SMOKE, f"run_dir={tmp_path}/run", f"tracking.tracking_uri={uri}"])
    finally:
        server.shutdown()
    assert rc == 3
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "MLFLOW_TRACKING_USERNAME" in err and "wrong" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "base",
    [
        "s3://bucket/x?endpoint_override=http://10.0.0.2:5555&scheme=http",
        "s3://bucket?scheme=http",
        "gs://bucket/a/",
        "/abs/path",
        "file:///abs/path",
    ],
)
def test_storage_join_keeps_the_uri_query_like_ray(base):
    from ray.air._internal.uri_utils import URI

    from pipeline.storage import join_storage

    joined = join_storage(base, "search-0123456789ab")
    assert joined == str(URI(base) / "search-0123456789ab")
    assert "?" not in base or joined.endswith("?" + base.split("?", 1)[1])


def test_resource_demands_against_nodes():
    from pipeline.cluster import Node, check_resources
    from rarn.config import ConfigError

    cfg = load_config(SMOKE, ["tune.retrain_workers=3", "tune.cpus_per_trial=2"])
    two = [Node("a", "10.0.0.2", {"CPU": 2.0}), Node("b", "10.0.0.3", {"CPU": 1.0})]
    assert check_resources(cfg, ["retrain"], two, can_grow=False) == []  # 2 + 1 workers fit
    with pytest.raises(ConfigError, match=r"search trial .* needs 1 x \(2 CPU\)"):
        check_resources(cfg, ["search"], two[1:], can_grow=False)
    waits = check_resources(cfg, ["search", "retrain"], two[1:], can_grow=True)
    assert len(waits) == 2 and all("wait until nodes join" in w for w in waits)
    assert "holds 0 now" in waits[0] and "needs 3 x (1 CPU)" in waits[1]
    gpu = load_config(SMOKE, ["tune.gpus_per_trial=0.5"])
    one_gpu = [Node("g", "10.0.0.4", {"CPU": 8.0, "GPU": 1.0})]
    assert check_resources(gpu, ["search"], one_gpu, can_grow=False) == []


def test_task_cpus_fill_the_idle_cpus_up_to_a_node():
    """Evaluation/transfer tasks: a trial's share at least, an equal share of the cluster's
    CPUs where they would idle, never more than the largest node holds, whole CPUs."""
    from pipeline.cluster import Node, task_cpus

    one = [Node("a", "10.0.0.2", {"CPU": 2.0})]
    assert task_cpus(1.0, 1, one) == 2.0  # one model on 2 CPUs: both cores, not one
    assert task_cpus(1.0, 2, one) == 1.0 and task_cpus(1.0, 5, one) == 1.0  # never below
    assert task_cpus(3.0, 1, one) == 3.0  # the configured share stands (its check is elsewhere)
    three = [Node("h", "10.0.0.1", {"CPU": 0.0}), *(Node(w, "", {"CPU": 4.0}) for w in "bc")]
    assert task_cpus(1.0, 1, three) == 4.0  # one node's CPUs: a task runs on one node
    assert task_cpus(1.0, 3, three) == 2.0 and task_cpus(0.5, 16, three) == 0.5
    assert task_cpus(1.0, 0, three) == 1.0 and task_cpus(1.0, 1, []) == 1.0
    uneven = [Node("a", "", {"CPU": 4.0}), Node("b", "", {"CPU": 1.0})]
    assert task_cpus(1.0, 2, uneven) == 2.0  # 2 + 2 on a (2.5 each would not fit)
    assert task_cpus(1.0, 3, uneven) == 1.0  # 3 x 1: a holds 4, so 1 each (not 5 / 3)


def test_a_task_gets_as_many_torch_threads_as_cpus(ray_local):
    """Ray reuses worker processes across tasks: torch keeps the thread count of the first
    task's ``OMP_NUM_THREADS`` unless :func:`use_assigned_cpus` sets it (measured: a 2-CPU
    task in a process a 1-CPU task had started ran 1 thread)."""
    import ray

    from pipeline.cluster import use_assigned_cpus

    @ray.remote
    def threads(set_them: bool) -> tuple[int, int]:
        import os

        import torch

        n = use_assigned_cpus() if set_them else -1
        return os.getpid(), torch.get_num_threads() if set_them else n

    pid1, _ = ray.get(threads.options(num_cpus=1).remote(False))
    pid2, n = ray.get(threads.options(num_cpus=2).remote(True))
    assert n == 2, (pid1, pid2)
    pid3, n = ray.get(threads.options(num_cpus=1).remote(True))
    assert n == 1


def test_multi_node_rejects_a_local_tracking_store(ray_local, tmp_path, monkeypatch, capsys):
    """``tune.cluster=multi-node`` runs the multi-node checks on the one local node: the run_dir
    probe passes (the node sees it), the sqlite store does not."""
    from pipeline.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rc = main(["--config", SMOKE, "--quiet", f"run_dir={tmp_path}/run", "tune.cluster=multi-node"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "multi-node" in err and "is a file on one node" in err and "run_dir" not in err
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, nothing else was written


@pytest.mark.slow
@single_node_fallback("the Ray Train run's name (retrain-<key>-<parent run>)")
def test_two_runs_into_one_storage_path_do_not_collide(ray_local, tmp_path, monkeypatch):
    """Ray Train run names carry the pipeline run's id: the second run into the same
    ``tune.storage_path`` starts its own Ray Train run instead of resuming the first one's."""
    from pipeline.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    common = ["--config", SMOKE, "--stages", "retrain", "--quiet", "retrain.genotype=RACL",
              f"tune.storage_path={tmp_path}/shared", "tune.retrain_workers=2"]  # fmt: skip
    for name in ("a", "b"):
        assert main([*common, f"run_dir={tmp_path}/{name}"]) == 0
    parents = [json.loads((tmp_path / n / "state.json").read_text())["parent_run_id"]
               for n in "ab"]  # fmt: skip
    runs = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert runs == sorted(f"retrain-RACL-{pid[:12]}" for pid in parents)


def test_ddp_ranks_take_a_reshuffled_distributed_sampler_share_each_epoch():
    """Two ranks: disjoint equal shares covering the split, a new shuffle every epoch (not a
    fixed strided slice), the same order again for the same epoch (exact resume)."""
    from types import SimpleNamespace

    import torch

    from rarn.data import TensorImageDataset
    from rarn.robust.retrain import _loaders

    n = 64
    x = torch.arange(n, dtype=torch.float32).div(n).view(n, 1, 1, 1)  # the image is its index
    bundle = SimpleNamespace(train=TensorImageDataset(x, torch.zeros(n, dtype=torch.long)))
    cfg = replace(load_config(SMOKE).retrain, val_fraction=0.0, batch_size=8)

    def epoch(rank: int, e: int) -> list[int]:
        loader, _ = _loaders(cfg, bundle, (rank, 2), torch.Generator().manual_seed(0))
        loader.set_epoch(e)
        assert len(loader) == 4
        return [round(float(v) * n) for xb, _ in loader for v in xb.flatten()]

    e1 = [epoch(r, 1) for r in (0, 1)]
    assert sorted(e1[0] + e1[1]) == list(range(n)) and len(e1[0]) == len(e1[1]) == n // 2
    assert e1[0] != list(range(0, n, 2))  # not the old fixed strided slice
    e2 = epoch(0, 2)
    assert set(e2) != set(e1[0])  # rank 0 sees other samples in the next epoch
    assert epoch(0, 1) == e1[0]  # the same epoch, the same order (resume)


def test_every_entry_point_gets_the_quiet_defaults_before_mlflow_is_imported(tmp_path):
    """``python -m pipeline.registry`` and the modules that import MLflow (pipeline.tracking) as
    well as the CLI: the package sets the quiet defaults first; the loopback ones only where a
    driver starts its own Ray."""
    code = (
        "import os, sys; import pipeline.registry, pipeline.tracking\n"
        "assert 'mlflow' in sys.modules\n"
        "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], os.environ['RAY_USAGE_STATS_ENABLED'],"
        " os.environ.get('RAY_AUTH_MODE'))"
    )
    env = {k: v for k, v in _plain_env(tmp_path).items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.split() == ["true", "0", "None"]
