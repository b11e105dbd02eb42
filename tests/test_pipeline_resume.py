"""An interrupted driver: SIGINT, then SIGKILL, then ``--resume`` to the end.

Trial t00 (1 epoch) finishes before the first interruption; t01 (16 epochs) is mid-way each time.
Afterwards: t00 ran once, t01 never restarted from epoch 0 (each restart began at its last
committed epoch, also after the SIGKILL, when Tune's own experiment snapshot may lag), every
epoch is logged once in t01's single MLflow run, and every run ended FINISHED. The drivers are
separate processes with their own Ray instances (every listener on loopback, checked here);
everything they started is killed by PID.

It runs where the three-node cluster of ``test_pipeline_multinode.py`` cannot be built (not root,
no iproute2): there the same interruptions (SIGTERM, which the driver turns into SIGINT; SIGKILL
of the driver) and resumes run as submitted jobs with the same checks (CI time, issue 20);
``test_pipeline_cluster.py`` checks a plain driver's loopback listeners.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_cluster import single_node_fallback
from trial_files import committed_epoch
from trial_files import start_epochs as _starts

from pipeline.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/smoke.yaml")
EPOCHS = 16  # t01: still running at both interruptions (an epoch takes 0.3-1.5 s)


def _driver(tmp: Path, *extra: str) -> subprocess.Popen:
    trials = f"tune.param_space={{search.epochs: [1, {EPOCHS}]}}"  # t00: 1 epoch, t01: many
    cmd = [sys.executable, str(ROOT / "pipeline/run.py"), "--config", SMOKE, "--stages", "search",
           "--quiet", f"run_dir={tmp}/run", trials, *extra]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    log = open(tmp / f"driver{len(list(tmp.glob('driver*.log')))}.log", "w")
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"driver exited early ({proc.returncode}) waiting for {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def _attempts(trial: Path) -> list[int]:
    try:
        return _starts(trial)
    except (OSError, ValueError):
        return []


def _listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state that ``pids`` hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(cols[1].split(":")[0])
    return found


# 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc/net/tcp{,6} print them
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.slow
@single_node_fallback("the same interruptions (SIGTERM, handled as SIGINT; SIGKILL; --resume)")
def test_sigint_then_sigkill_then_resume(tmp_path, reaper):
    t00, t01 = (tmp_path / "run/search/trials" / k for k in ("t00", "t01"))
    # 1. SIGINT once t00 has finished and t01 has a checkpoint: Tune saves its state, exit 130.
    p = _driver(tmp_path)
    reaper.track_tree(p.pid)
    _wait(
        lambda: (t00 / "genotype.json").is_file() and committed_epoch(t01) >= 1, p, 240, "t00 done"
    )
    time.sleep(2.0)  # let Tune record t00 as TERMINATED
    assert committed_epoch(t01) < EPOCHS, "t01 finished too early for the test"
    listening = _listening_addresses(reaper.track_tree(p.pid))
    assert listening and listening <= LOOPBACK, listening  # every Ray listener on loopback
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    at_sigint = committed_epoch(t01)
    # 2. --resume, then SIGKILL once t01 has made progress: no state saved on the way out.
    p = _driver(tmp_path, "--resume")
    # A new attempt must have started (attempts.jsonl) and advanced: a late write of the
    # interrupted attempt alone would otherwise satisfy the progress check.
    _wait(
        lambda: len(_attempts(t01)) >= 2 and committed_epoch(t01) > at_sigint,
        p,
        240,
        "t01 progress after the first resume",
    )
    assert committed_epoch(t01) < EPOCHS, "t01 finished too early for the test"
    reaper.track_tree(p.pid)  # the driver, its Ray processes and workers, by PID
    p.kill()
    p.wait(timeout=30)
    reaper.kill_all()  # the orphans a SIGKILLed driver leaves behind (ENV.md §5)
    at_sigkill = committed_epoch(t01)
    # 3. --resume to the end.
    p = _driver(tmp_path, "--resume")
    reaper.track_tree(p.pid)
    assert p.wait(timeout=300) == 0, (tmp_path / "driver2.log").read_text()[-3000:]

    assert _starts(t00) == [0]  # the finished trial was never rerun
    starts = _starts(t01)
    assert starts[0] == 0 and all(s >= 1 for s in starts[1:])  # never from epoch 0 again
    assert len(starts) >= 3 and starts[-1] >= at_sigkill >= starts[1] >= 1
    tracking = Tracking(f"sqlite:///{tmp_path}/mlflow.db", "", "")
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name("rarn-smoke").experiment_id])
    search = {r.data.tags["rarn.key"]: r for r in runs if r.data.tags.get("rarn.role") == "search"}
    assert sorted(search) == ["t00", "t01"]  # the resumed trial continued its own run
    steps = [m.step for m in client.get_metric_history(search["t01"].info.run_id, "epoch")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))  # every epoch logged exactly once
    assert {r.info.status for r in runs} == {"FINISHED"}
    state = json.loads((tmp_path / "run/state.json").read_text())
    assert state["search"]["done"] and len(state["search"]["selected"]) == 1
