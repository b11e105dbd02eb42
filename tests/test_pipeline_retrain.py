"""The one-worker retraining (the default ``tune.retrain_workers=1``): a plain Ray task instead of
a ``TorchTrainer``, with the same fault tolerance. Its worker process SIGKILLed after an epoch,
Ray retries the task (``tune.max_failures``) and the retry resumes from rank 0's last commit in
its one MLflow run; a retraining that fails on every attempt ends FAILED with the error named and
the other stages' state kept. (Two or more workers are Ray Train's: test_pipeline_e2e.py and the
three-node module.)"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from trial_files import committed_epoch, start_epochs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/smoke.yaml")
pytestmark = pytest.mark.slow


def _kill_after_first_commit(rank0: Path, killed: list[int], timeout: float = 120.0) -> None:
    """SIGKILL the process of the rank's current attempt once it has committed an epoch."""
    t0 = time.monotonic()
    while committed_epoch(rank0) < 1:
        if time.monotonic() - t0 > timeout:
            return
        time.sleep(0.02)
    pid = json.loads((rank0 / "attempts.jsonl").read_text().splitlines()[-1])["pid"]
    killed.append(committed_epoch(rank0))
    os.kill(pid, signal.SIGKILL)


def _retrain(tmp_path: Path, *overrides: str) -> int:
    from pipeline.run import main

    return main(["--config", SMOKE, "--stages", "retrain", "--quiet", "retrain.genotype=RACL",
                 f"run_dir={tmp_path}/run", *overrides])  # fmt: skip


def test_a_killed_worker_is_retried_and_resumes_from_its_last_commit(
    ray_local, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rank0, killed = tmp_path / "run/retrain/RACL/rank0", []
    killer = threading.Thread(target=_kill_after_first_commit, args=(rank0, killed), daemon=True)
    killer.start()
    assert _retrain(tmp_path, "retrain.epochs=4", "tune.max_failures=1") == 0
    killer.join(5)
    assert killed, "the worker finished before it could be killed"
    starts = start_epochs(rank0)  # the retry started from the commit, not from 0
    assert len(starts) == 2 and starts[0] == 0 and killed[0] <= starts[1] <= killed[0] + 1, starts
    assert committed_epoch(rank0) == 4

    state = json.loads((tmp_path / "run/state.json").read_text())
    outcome = state["retrain"]["RACL"]
    assert outcome["error"] is None and outcome["model_uri"], outcome
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(outcome["retrain_run_id"])  # one run through both attempts
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_acc")]
    assert sorted(steps) == [1, 2, 3, 4], steps  # every epoch logged once


def test_a_retraining_that_always_fails_names_its_error(ray_local, tmp_path, monkeypatch):
    """Every attempt diverges (a learning rate of 1e30): the retry is made (two attempts, the
    second from the first's last commit or 0), then the stage reports the error by name, the
    run ends FAILED and no model is logged."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rc = _retrain(tmp_path, "retrain.lr=1e30", "retrain.epochs=2", "tune.max_failures=1")
    state = json.loads((tmp_path / "run/state.json").read_text())
    outcome = state["retrain"]["RACL"]
    assert rc != 0 and outcome["model_uri"] is None, (rc, outcome)
    assert "TrainingDiverged" in outcome["error"], outcome
    assert len(start_epochs(tmp_path / "run/retrain/RACL/rank0")) == 2  # retried once
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(outcome["retrain_run_id"])
    assert run.info.status == "FAILED"
