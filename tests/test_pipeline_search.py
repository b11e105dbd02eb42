"""The Tune search stage under faults, on the shared 2-CPU Ray instance.

One experiment, four trials: a diverging one (errored, skipped by selection), one whose
checkpoint is corrupted before it starts (a clear error for that trial only), one whose worker
is SIGKILLed after its first epoch (retried, resumed from that epoch), and a healthy one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.checkpoints import TrialStore
from pipeline.search import SearchJob, build_tuner, collect_outcomes, select_top_k
from pipeline.tracking import prepare_tracking
from rarn.config import load_config
from rarn.data import load_dataset
from rarn.nas.loop import SearchData, run_search

ROOT = Path(__file__).resolve().parents[1]


def _kill_after_first_epoch(store: TrialStore, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the trial's worker process (its recorded PID) once epoch 1 is committed."""
    while not stop.is_set():
        attempts = store.root / "attempts.jsonl"
        if store.latest() is not None and attempts.is_file():
            pid = json.loads(attempts.read_text().splitlines()[0])["pid"]
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)  # four 4-epoch smoke searches through Tune, one killed and resumed
def test_search_faults_diverged_corrupted_killed(ray_local, tmp_path):
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"run_dir={tmp_path}/run", "search.epochs=4", "tune.max_failures=1", "tune.top_k=4"],
    )
    run_dir = tmp_path / "run"
    bundle = load_dataset(cfg.data)
    data = SearchData.from_bundle(bundle, cfg.data.train_portion, cfg.data.seed)
    tracking = prepare_tracking(
        cfg, uri=f"sqlite:///{tmp_path}/mlflow.db", run_dir=run_dir, fingerprint="f" * 64
    )
    job = SearchJob(cfg, tracking, str(run_dir))
    points = [
        {"key": "t00", "search.seed": 0},  # killed after epoch 1
        {"key": "t01", "search.seed": 0, "search.lr": 1e30},  # diverges
        {"key": "t02", "search.seed": 2},  # its checkpoint is corrupted
        {"key": "t03", "search.seed": 3},  # healthy
    ]
    # t02: a real epoch-1 checkpoint from an earlier attempt, then one flipped byte on disk.
    store = job.store("t02")
    run_search(replace(cfg.search, epochs=1), cfg.constraint, data, checkpoint_dir=store.work)
    ckpt = store.commit(1)
    raw = bytearray((ckpt / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ckpt / "checkpoint.pt").write_bytes(bytes(raw))

    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_after_first_epoch, args=(job.store("t00"), killed, stop))
    killer.start()
    try:
        tuner = build_tuner(cfg, data, job, storage_path=str(run_dir / "ray"), points=points,
                            verbose=0)  # fmt: skip
        results = tuner.fit()
    finally:
        stop.set()
        killer.join()
    outcomes = {o.key: o for o in collect_outcomes(results, cfg, tracking)}

    assert killed, "the killer thread never saw t00's first checkpoint"
    assert outcomes["t00"].status == outcomes["t03"].status == "TERMINATED"
    assert outcomes["t01"].status == "ERROR"
    assert "SearchDiverged" in outcomes["t01"].error or "diverged" in outcomes["t01"].error
    # t02's damaged checkpoint was never recorded by the tracking store (issue 21: the run
    # directory is untrusted): it is skipped, not loaded, and t02 starts afresh and finishes.
    assert outcomes["t02"].status == "TERMINATED"
    # Selection skips the errored trial.
    ranked = sorted(select_top_k(list(outcomes.values()), 4, "val_acc", "max"))
    assert ranked == ["t00", "t02", "t03"]

    # t00 resumed from its last checkpoint epoch, in a new worker, into the same MLflow run.
    lines = (job.store("t00").root / "attempts.jsonl").read_text().splitlines()
    attempts = [json.loads(ln) for ln in lines]
    assert [a["start_epoch"] for a in attempts][0] == 0
    assert len(attempts) == 2 and attempts[1]["start_epoch"] >= 1
    assert attempts[1]["pid"] != killed["pid"]
    client = tracking.client()
    runs = {r.data.tags["rarn.key"]: r for r in tracking.children("search")}
    assert sorted(runs) == ["t00", "t01", "t02", "t03"]  # one run per trial, none duplicated
    epochs = [m.step for m in client.get_metric_history(runs["t00"].info.run_id, "epoch")]
    assert sorted(epochs) == [1, 2, 3, 4]  # each once, the killed epoch's too (backfilled)
    status = {k: r.info.status for k, r in runs.items()}
    assert status == {"t00": "FINISHED", "t01": "FAILED", "t02": "FINISHED", "t03": "FINISHED"}
    assert runs["t00"].data.tags["rarn.resumed_from_epoch"] == str(attempts[1]["start_epoch"])
