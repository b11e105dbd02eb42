"""``Tuner.restore`` pointing a trial at a Tune checkpoint that is gone (shared Ray instance).

After a driver SIGKILL, Tune's experiment snapshot on storage can lag behind the trial: it names
a ``checkpoint_*`` folder that ``CheckpointConfig(num_to_keep=1)`` already deleted when the next
one arrived. Ray raises "Could not recover from checkpoint as it does not exist on storage
anymore" in the trial actor's ``Trainable.restore``, before the trainable's code runs, and the
trial errored on every retry. The pipeline's trainable skips such a restore and resumes from its
own newest commit (:mod:`pipeline.checkpoints`), which is authoritative.

Reproduced deterministically: the experiment is interrupted (SIGINT: Tune saves its state with the
trial RUNNING and its latest checkpoint recorded), every ``checkpoint_*`` folder of the trial is
deleted from storage, and the search is resumed with the pipeline's ``build_tuner``.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from trial_files import committed_epoch, start_epochs

from pipeline.search import SearchJob, build_tuner, collect_outcomes, experiment_name, fit
from pipeline.tracking import prepare_tracking
from rarn.config import load_config
from rarn.data import load_dataset
from rarn.nas.loop import SearchData

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 8  # still running when interrupted (an epoch takes 0.3-1.5 s)


def _interrupt_after(trial: Path, epoch: int, stop: threading.Event, sent: dict) -> None:
    """SIGINT this process (Tune's handler: stop, save the experiment) once ``epoch`` is
    committed."""
    while not stop.is_set():
        if committed_epoch(trial) >= epoch:
            time.sleep(0.5)  # let Tune process the report (its checkpoint is then recorded)
            sent["epoch"] = committed_epoch(trial)
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_survives_a_deleted_tune_checkpoint(ray_local, tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml",
                      [f"run_dir={tmp_path}/run", f"search.epochs={EPOCHS}"])  # fmt: skip
    run_dir, storage = tmp_path / "run", str(tmp_path / "run" / "ray")
    data = SearchData.from_bundle(load_dataset(cfg.data), cfg.data.train_portion, cfg.data.seed)
    tracking = prepare_tracking(
        cfg, uri=f"sqlite:///{tmp_path}/mlflow.db", run_dir=run_dir, fingerprint="f" * 64
    )
    job = SearchJob(cfg, tracking, str(run_dir))
    points = [{"key": "t00", "search.seed": 0}]
    trial = job.store("t00").root

    # 1. Interrupted mid-way: Tune saves its state, the trial RUNNING with a checkpoint.
    stop, sent = threading.Event(), {}
    watcher = threading.Thread(target=_interrupt_after, args=(trial, 2, stop, sent))
    watcher.start()
    try:
        tuner = build_tuner(cfg, data, job, storage_path=storage, points=points, verbose=0)
        _, interrupted = fit(tuner)
    finally:
        stop.set()
        watcher.join()
    assert interrupted and sent, "the search was not interrupted"
    at_interrupt = committed_epoch(trial)
    assert 2 <= at_interrupt < EPOCHS, at_interrupt

    # 2. The checkpoint Tune would restore is gone from storage (what num_to_keep=1 deletes).
    experiment = Path(storage) / experiment_name(job)
    gone = sorted(experiment.glob("t00/checkpoint_*"))
    assert gone, "Tune recorded no checkpoint for the trial"
    for d in gone:
        shutil.rmtree(d)

    # 3. Resumed: the trial continues from its own newest commit, not from epoch 0.
    tuner = build_tuner(cfg, data, job, storage_path=storage, points=points, resume=True,
                        verbose=0)  # fmt: skip
    results, interrupted = fit(tuner)
    assert not interrupted
    (outcome,) = collect_outcomes(results, cfg, tracking)
    assert outcome.status == "TERMINATED" and outcome.error is None, outcome.error
    assert outcome.complete and outcome.metrics["epoch"] == EPOCHS
    starts = start_epochs(trial)
    assert starts == [0, at_interrupt], starts  # resumed once, from the local commit
    assert committed_epoch(trial) == EPOCHS
