"""Two pipelines started on one run directory, and what a person watching the search sees.

The drivers are separate processes with their own Ray instances, run as a user runs them (Tune's
default console engine: ``RAY_AIR_NEW_OUTPUT`` unset); everything they start is killed by PID.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.console import trial_line

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/smoke.yaml")


def _driver(tmp: Path, run: str, log: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "pipeline/run.py"), "--config", SMOKE, "--stages", "search",
           f"run_dir={tmp}/{run}", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_AIR_NEW_OUTPUT"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    out = open(tmp / log, "w")
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_runs_on_one_run_dir_and_a_readable_console(tmp_path, reaper):
    # The database exists first, so neither driver races the schema migration.
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()
    a, b = _driver(tmp_path, "run", "a.log"), _driver(tmp_path, "run", "b.log")
    # --verbose brings Tune's per-result output (every metric) back: its own run directory, at
    # the same time (the driver start-ups overlap; the suite's time, issue 20).
    v = _driver(tmp_path, "run-verbose", "v.log", "tune.param_space={}", "--verbose")
    for p in (a, b, v):
        reaper.track_tree(p.pid)
    codes = {a.pid: a.wait(timeout=600), b.pid: b.wait(timeout=600)}
    logs = {a.pid: (tmp_path / "a.log").read_text(), b.pid: (tmp_path / "b.log").read_text()}
    assert sorted(codes.values()) == [0, 2], logs
    winner = next(pid for pid, rc in codes.items() if rc == 0)
    loser = next(pid for pid, rc in codes.items() if rc == 2)
    assert f"PID {winner} on host {socket.gethostname()}" in logs[loser], logs[loser]
    assert "in use" in logs[loser]
    # The winner's console: a compact table and one line per finished trial, no result boxes.
    out = logs[winner]
    assert "val acc" in out and "P(h<=0)" in out and "mu_F" in out, out
    for key in ("t00", "t01"):
        assert (
            sum(line.startswith(f"[search] {key} finished: epoch 2") for line in out.splitlines())
            == 1
        )
    assert "log_lambda_bar" not in out and "grad_norm" not in out and "╭" not in out, out
    tables = [i for i, line in enumerate(out.splitlines()) if line.startswith("== Status ==")]
    assert len(tables) <= 12, out  # printed when something changed, not every few seconds
    assert v.wait(timeout=600) == 0, (tmp_path / "v.log").read_text()[-3000:]
    assert "log_lambda_bar" in (tmp_path / "v.log").read_text()


class _Trial:
    config = {"trial": {"key": "t03", "search.seed": 1}}
    last_result = {"epoch": 4.0, "val_acc": 0.51234, "mu_F": 2.5, "h": -0.1, "train_loss": 1.0}


def test_trial_line_is_one_line_of_the_table_columns():
    assert trial_line(_Trial()) == (
        "[search] t03 finished: epoch 4, val acc 0.5123, mu_F 2.5, h -0.1 (search.seed=1)"
    )
    assert trial_line(_Trial(), error=True).startswith("[search] t03 FAILED: epoch 4")
