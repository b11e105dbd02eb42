"""The pipeline on a real three-node Ray cluster (:mod:`netns_cluster`): a head with no CPUs
(the driver only) and two one-CPU worker nodes in network namespaces, an MLflow server on the
head, ``shared/`` as the storage every node mounts. Every job is submitted from the host with
``ray job submit --working-dir .``, as a user would.

What is checked, one cluster for the module, tests in order:

1. a job whose ``run_dir`` is node-local (the default, inside the job's working directory on the
   head) and whose tracking store is an sqlite file is refused before any trial (exit 2), naming
   the nodes that cannot see the run directory;
2. run a, the smoke pipeline with ``run_dir`` on shared storage and ``tune.storage_path`` in S3
   (moto on the head, ``s3://rarn/ray?endpoint_override=...``; the shared file system where
   ``moto_server`` is not installed): its two search trials run on both worker nodes; its
   retraining (two Ray Train workers, one per worker node) loses a node after its first epoch
   and resumes from the last epoch once the node is back; the champion's lineage is on the
   MLflow server, and no node wrote a local tracking store (this is also the ``ray job submit``
   test of ``test_pipeline_cluster.py``, which runs only where this module cannot);
3. run b, into the same ``tune.storage_path``: killing the worker node that runs a trial (SIGKILL
   on all its processes) resumes that trial on the other node from its last checkpoint; then
   SIGKILL of the driver, and ``--resume`` as a new job restores the experiment from the bucket:
   the finished trial is not rerun from 0, the other continues from its last committed epoch, in its
   one MLflow run with every epoch logged once; runs a and b each have their own Tune
   experiment. (SIGTERM, which ``ray job stop`` sends, ends a driver like Ctrl-C: the plain
   driver test of ``test_pipeline_cluster.py``.)

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
from trial_files import attempt_nodes, committed_epoch
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


def _wait_for(cond, what: str, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def _storage(cluster: NetnsCluster) -> str:
    """``tune.storage_path`` of runs a and b: the moto bucket, else the shared file system."""
    if cluster.s3:
        return f"s3://rarn/ray?endpoint_override={cluster.s3}&scheme=http"
    return str(cluster.shared / "ray")


def _stored(cluster: NetnsCluster) -> dict[str, set[str]]:
    """The runs in the storage path (``search-<parent>``, ``retrain-<key>-<parent>``), each with
    the names of its top-level entries."""
    if cluster.s3:
        keys = [k.split("/")[1:3] for k in cluster.s3_keys("rarn", "ray/")]
    else:
        root = cluster.shared / "ray"
        keys = [[d.name, f.name] for d in root.iterdir() if d.is_dir() for f in d.iterdir()]
    out: dict[str, set[str]] = {}
    for k in (k for k in keys if k and k[0]):  # not the prefix's own folder marker
        out.setdefault(k[0], set()).add(k[1] if len(k) > 1 else "")
    return out


def _parent(run: Path) -> str:
    return json.loads((run / "state.json").read_text())["parent_run_id"]


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
    run = cluster.shared / "runs/a"
    job = "smoke-a"
    # --force-promote: the chance-level smoke model earns no promotion (docs/registry.md)
    p = cluster.submit("--config", "configs/smoke.yaml", "--force-promote", f"run_dir={run}",
                       f"tune.storage_path={_storage(cluster)}", "tune.retrain_workers=2",
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

    trials = run / "search/trials"
    nodes = {key: set(attempt_nodes(trials / key)) for key in ("t00", "t01")}
    workers = {cluster.nodes[w].ip for w in ("w1", "w2")}
    assert nodes["t00"] | nodes["t01"] == workers, nodes  # both worker nodes ran a trial
    client = Tracking(cluster.tracking_uri, "", "").client()
    mv = client.get_model_version_by_alias("rarn-smoke", "champion")
    retrain = client.get_run(mv.tags["rarn.retrain_run_id"])
    search = client.get_run(mv.tags["rarn.search_run_id"])
    assert retrain.data.tags["rarn.search_run_id"] == search.info.run_id
    assert retrain.data.tags["mlflow.parentRunId"] == mv.tags["rarn.parent_run_id"]
    assert search.info.status == retrain.info.status == "FINISHED"
    # the Tune experiment and the Ray Train run are named after the pipeline's parent run: runs
    # into one storage path never resume each other's (test_pipeline_cluster.py runs two
    # retrainings into one path where this module cannot)
    parent = mv.tags["rarn.parent_run_id"][:12]
    stored = _stored(cluster)
    assert set(stored) == {f"search-{parent}", f"retrain-{mv.tags['rarn.trial_key']}-{parent}"}
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
    """Run b, into run a's ``tune.storage_path`` (the bucket): t00 finishes after one epoch;
    t01's worker node dies after two epochs (t01 resumes on the other node), then the driver is
    SIGKILLed, then ``--resume`` restores the experiment from the storage and finishes."""
    run = cluster.shared / "runs/b"
    t00, t01 = run / "search/trials/t00", run / "search/trials/t01"
    args = [*SEARCH, f"run_dir={run}", f"tune.storage_path={_storage(cluster)}", LONG_T01]
    p = cluster.submit(*args, job_id="node-loss")
    _wait_for(lambda: committed_epoch(t00) == 1 and committed_epoch(t01) >= 2,
              "t00's one epoch and t01's second", 400)  # fmt: skip
    victim_ip = attempt_nodes(t01)[-1]
    victim = next(n for n, node in cluster.nodes.items() if node.ip == victim_ip)
    assert victim != "head"
    cluster.kill_node(victim)
    at_node_loss = committed_epoch(t01)
    # t01 resumed on the other node (the victim is still down) and committed from there ...
    _wait_for(lambda: len(_starts(t01)) >= 2 and committed_epoch(t01) > at_node_loss,
              "t01's first commit after the node loss")  # fmt: skip
    ips = attempt_nodes(t01)
    assert ips[0] == victim_ip and ips[1] != victim_ip, ips  # resumed elsewhere
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
    assert all(e == 1 for e in _starts(t00)[1:]), _starts(t00)  # finished: never rerun from 0
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
    # Each run in the shared storage path has its own Tune experiment, restored from there.
    stored = _stored(cluster)
    runs_ab = {f"search-{_parent(cluster.shared / f'runs/{r}')[:12]}" for r in "ab"}
    assert len(runs_ab) == 2 and runs_ab <= set(stored), stored
    assert "tuner.pkl" in stored[f"search-{parent[:12]}"], stored
    cluster.wait_alive(3)
