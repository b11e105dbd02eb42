"""The pipeline on a real three-node Ray cluster (:mod:`netns_cluster`): a head with no CPUs
(the driver only) and two one-CPU worker nodes in network namespaces, an MLflow server on the
head, ``shared/`` as the storage every node mounts. Every job is submitted from the host with
``ray job submit --working-dir .``, as a user would.

What is checked, one cluster for the module, tests in order:

1. a job whose ``run_dir`` is node-local (the default, inside the job's working directory on the
   head) and whose tracking store is an sqlite file is refused before any trial (exit 2), naming
   the nodes that cannot see the run directory;
2. run a, the smoke pipeline with ``run_dir`` and ``tune.storage_path`` on shared storage: its
   two search trials run on both worker nodes; its retraining (two Ray Train workers, one per
   worker node) loses a node after its first epoch and resumes from the last epoch once the
   node is back; the champion's lineage is on the MLflow server, and no node wrote a local
   tracking store (this is also the ``ray job submit`` test of ``test_pipeline_cluster.py``,
   which runs only where this module cannot);
3. run b, into the same ``tune.storage_path``: killing the worker node that runs a trial (SIGKILL
   on all its processes) resumes that trial on the other node from its last checkpoint; then
   SIGKILL of the driver, and ``--resume`` as a new job continues from the shared storage, the
   trial from its last committed epoch, in its one MLflow run with every epoch logged once;
   runs a and b each have their own Tune experiment;
4. run c, Tune's state in S3 (moto, ``s3://rarn/ray?endpoint_override=...``): ``ray job stop``
   (SIGTERM) mid-search ends the driver with the resume hint, and ``--resume`` restores the
   experiment from the bucket (skipped where ``moto_server`` is not installed).

Skips, with the reason, where namespaces cannot be made (not root, no ``ip``/``unshare``).
Run the module alone: it needs about 2.5 GB and both cores for a few minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from netns_cluster import ClusterUnavailable, NetnsCluster, unavailable_reason
from trial_files import committed_epoch
from trial_files import start_epochs as _starts

from pipeline.tracking import Tracking

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SEARCH = ["--config", "configs/smoke.yaml", "--stages", "search"]
LONG_T01 = "tune.param_space={search.epochs: [1, 7]}"  # t00: 1 epoch; t01 runs long enough


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no three-node test cluster here: {reason}")
    try:
        c = NetnsCluster.up()
    except ClusterUnavailable as e:
        pytest.skip(f"no three-node test cluster here: {e}")
    yield c
    c.down()


def _finish(cluster: NetnsCluster, proc: subprocess.Popen, job: str, timeout: float) -> str:
    """Wait for a submitted job; returns its final status (the logs go into the assertion)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"job {job} still {cluster.job_status(job)} after {timeout} s:\n"
                    + _logs(cluster, job))  # fmt: skip
    return cluster.job_status(job)


def _logs(cluster: NetnsCluster, job: str) -> str:
    return cluster.job_logs(job)[-5000:]


def _node_ips(experiment: Path, key: str) -> list[str]:
    """The node of every result Tune recorded for trial ``key``, in order."""
    lines = (experiment / key / "result.json").read_text().splitlines()
    return [json.loads(ln)["node_ip"] for ln in lines if ln.strip()]


def _wait_for(cond, what: str, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def _experiment(storage: Path, run: Path) -> Path:
    parent = json.loads((run / "state.json").read_text())["parent_run_id"]
    return storage / f"search-{parent[:12]}"


def test_node_local_run_dir_and_sqlite_tracking_are_refused(cluster):
    db = cluster.shared / "local.db"
    job = "refused"
    p = cluster.submit(*SEARCH, f"tracking.tracking_uri=sqlite:///{db}", job_id=job)
    assert _finish(cluster, p, job, 300) == "FAILED"
    logs = _logs(cluster, job)
    assert "on a multi-node cluster (3 node(s)" in logs, logs
    assert "is a file on one node" in logs and "run_dir" in logs and "node-local" in logs
    workers = [cluster.nodes[w].ip for w in ("w1", "w2")]
    assert all(ip in logs for ip in workers) and cluster.head.ip not in logs.split("not seen")[1]
    assert "Ray Tune" not in logs and not db.exists()  # refused before any trial


def test_smoke_pipeline_runs_on_both_workers_and_survives_a_retrain_node_loss(cluster):
    """Run a: the smoke pipeline, retrained by two Ray Train workers (one per worker node); w2
    dies after the first retraining epoch and comes back: the worker group resumes."""
    run, storage = cluster.shared / "runs/a", cluster.shared / "ray"
    job = "smoke-a"
    # --force-promote: the chance-level smoke model earns no promotion (docs/registry.md)
    p = cluster.submit("--config", "configs/smoke.yaml", "--force-promote", f"run_dir={run}",
                       f"tune.storage_path={storage}", "tune.retrain_workers=2",
                       "retrain.epochs=6", job_id=job)  # fmt: skip
    _wait_for(lambda: list(run.glob("retrain/*/rank0")), "the retraining", 400)
    rank0 = next(run.glob("retrain/*/rank0"))
    _wait_for(lambda: committed_epoch(rank0) >= 1, "the retraining's first epoch")
    cluster.kill_node("w2")
    at_kill = committed_epoch(rank0)
    cluster.start_node("w2")  # the two-worker group needs both nodes again
    assert _finish(cluster, p, job, 600) == "SUCCEEDED", _logs(cluster, job)
    assert "models:/rarn-smoke@champion" in cluster.job_logs(job)
    submitted = (cluster.base / "logs" / f"{job}.submit.log").read_text()
    assert "succeeded" in submitted, submitted[-3000:]  # what the user's `ray job submit` says
    starts = _starts(rank0)
    assert starts[0] == 0 and len(starts) >= 2 and at_kill <= starts[1] <= at_kill + 1, starts

    experiment = _experiment(storage, run)
    nodes = {key: set(_node_ips(experiment, key)) for key in ("t00", "t01")}
    workers = {cluster.nodes[w].ip for w in ("w1", "w2")}
    assert nodes["t00"] | nodes["t01"] == workers, nodes  # both worker nodes ran a trial
    client = Tracking(cluster.tracking_uri, "", "").client()
    mv = client.get_model_version_by_alias("rarn-smoke", "champion")
    retrain = client.get_run(mv.tags["rarn.retrain_run_id"])
    search = client.get_run(mv.tags["rarn.search_run_id"])
    assert retrain.data.tags["rarn.search_run_id"] == search.info.run_id
    assert retrain.data.tags["mlflow.parentRunId"] == mv.tags["rarn.parent_run_id"]
    assert search.info.status == retrain.info.status == "FINISHED"
    # the job tracked to the cluster's server only: no node fell back to a local store
    assert not [f for n in cluster.nodes for f in (cluster.base / n / "tmp").rglob("mlflow.db")]
    assert not list(cluster.project().rglob("mlflow.db"))
    cluster.wait_alive(3)


def _driver_pids(cluster: NetnsCluster, marker: str) -> list[int]:
    """The driver of the job whose arguments contain ``marker`` (in the head's namespace)."""
    pids = []
    for pid in cluster.pids_on("head"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if comm.startswith("python") and "pipeline/run.py" in args and marker in " ".join(args):
            pids.append(pid)
    return pids


def test_node_loss_then_driver_loss_then_resume(cluster):
    """Run b, into run a's ``tune.storage_path``: t01's worker node dies after two epochs (t01
    resumes on the other node), then the driver is SIGKILLed, then ``--resume`` finishes."""
    run, storage = cluster.shared / "runs/b", cluster.shared / "ray"
    t01 = run / "search/trials/t01"
    args = [*SEARCH, f"run_dir={run}", f"tune.storage_path={storage}", LONG_T01]
    p = cluster.submit(*args, job_id="node-loss")
    _wait_for(lambda: committed_epoch(t01) >= 2, "t01's second epoch", 400)
    experiment = _experiment(storage, run)
    victim_ip = _node_ips(experiment, "t01")[-1]
    victim = next(n for n, node in cluster.nodes.items() if node.ip == victim_ip)
    assert victim != "head"
    cluster.kill_node(victim)
    at_node_loss = committed_epoch(t01)
    # t01 resumed on the other node (the victim is still down) and reported from there ...
    _wait_for(lambda: len(_starts(t01)) >= 2 and len(_node_ips(experiment, "t01")) > at_node_loss,
              "t01's first report after the node loss")  # fmt: skip
    ips = _node_ips(experiment, "t01")
    assert ips[0] == victim_ip and ips[-1] != victim_ip, ips  # resumed elsewhere
    cluster.start_node(victim)
    # ... now the driver dies.
    (driver,) = _driver_pids(cluster, f"run_dir={run}")
    os.kill(driver, signal.SIGKILL)
    assert _finish(cluster, p, "node-loss", 120) == "FAILED"
    at_driver_loss = committed_epoch(t01)
    p = cluster.submit(*args, "--resume", job_id="resumed")
    assert _finish(cluster, p, "resumed", 600) == "SUCCEEDED", _logs(cluster, "resumed")

    starts = _starts(t01)  # each attempt started from the last committed epoch, never from 0
    assert starts[0] == 0 and starts[1] == at_node_loss >= 2, (starts, at_node_loss)
    assert len(starts) == 3 and at_driver_loss <= starts[2] <= at_driver_loss + 1, starts
    state = json.loads((run / "state.json").read_text())
    assert state["search"]["done"] and state["search"]["selected"]
    # In MLflow (on the server): t01's one run continued through both losses, every epoch
    # logged exactly once, every run of this pipeline FINISHED (test_pipeline_resume.py checks
    # the same on one node where this module cannot run).
    client = Tracking(cluster.tracking_uri, "", "").client()
    parent = state["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    search = [r for r in runs if r.data.tags.get("rarn.role") == "search"]
    assert sorted(r.data.tags["rarn.key"] for r in search) == ["t00", "t01"], search
    (r01,) = [r for r in search if r.data.tags["rarn.key"] == "t01"]
    steps = [m.step for m in client.get_metric_history(r01.info.run_id, "epoch")]
    assert sorted(steps) == list(range(1, 8)), steps  # LONG_T01: 7 epochs, each once
    assert {r.info.status for r in [*runs, client.get_run(parent)]} == {"FINISHED"}
    # Every run that shares the storage path has its own Tune experiment: no collision.
    runs = [r for r in (cluster.shared / "runs").iterdir() if (r / "state.json").is_file()]
    experiments = {e.name for e in storage.glob("search-*")}
    assert experiments == {_experiment(storage, r).name for r in runs} and len(runs) >= 1
    cluster.wait_alive(3)


def test_s3_storage_survives_ray_job_stop_and_resumes(cluster):
    """Run c keeps Tune's state in S3 (moto on the head, ``?endpoint_override=``): ``ray job
    stop`` mid-search (SIGTERM) ends the driver like Ctrl-C, and ``--resume`` restores the
    experiment from the bucket: the finished trial is not rerun, the other continues."""
    if not cluster.s3:
        pytest.skip("moto_server is not installed (pip install 'moto[server]'): no S3 server")
    run = cluster.shared / "runs/c"
    t00, t01 = run / "search/trials/t00", run / "search/trials/t01"
    storage = f"s3://rarn/ray?endpoint_override={cluster.s3}&scheme=http"
    args = [*SEARCH, f"run_dir={run}", f"tune.storage_path={storage}", LONG_T01]
    p = cluster.submit(*args, job_id="s3-stopped")
    _wait_for(lambda: committed_epoch(t00) == 1 and committed_epoch(t01) >= 2, "t01's 2nd epoch")
    time.sleep(2.0)  # let Tune record t00 as finished
    cluster.stop_job("s3-stopped")
    assert _finish(cluster, p, "s3-stopped", 120) == "STOPPED"
    logs = cluster.job_logs("s3-stopped")
    assert "interrupted; continue with:" in logs and "--resume" in logs, logs[-3000:]
    at_stop = committed_epoch(t01)
    p = cluster.submit(*args, "--resume", job_id="s3-resumed")
    assert _finish(cluster, p, "s3-resumed", 600) == "SUCCEEDED", _logs(cluster, "s3-resumed")
    assert _starts(t00) == [0]  # restored from the bucket: the finished trial was not rerun
    starts = _starts(t01)
    assert starts[0] == 0 and len(starts) == 2 and 2 <= starts[1] <= at_stop + 1, starts
    parent = json.loads((run / "state.json").read_text())["parent_run_id"]
    keys = cluster.s3_keys("rarn", f"ray/search-{parent[:12]}/")
    assert any(k.endswith("tuner.pkl") for k in keys), keys[:10]
