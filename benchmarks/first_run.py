"""Where a first run's time goes: the default pipeline (``make run``), timed per stage.

Runs ``python pipeline/run.py`` (``configs/default.yaml`` unless ``--config``; extra dotted
overrides after ``--``) in a subprocess with its own run directory and SQLite tracking store in a
temporary folder, then reads the stage times the pipeline itself measured: the parent run's
MLflow metrics ``time_<stage>_s`` (search, retrain, evaluate, study when configured, register,
total). Prints one JSON line with them, the whole command's wall time (Python start, Ray start
and shutdown included), the exit status and the load average before and after. The goal of
issue 20 is a default pipeline of at most 300 s on an idle 2-CPU machine.

    python benchmarks/first_run.py [--config configs/default.yaml] [--keep DIR] [-- search.epochs=2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 300.0


def stage_times(uri: str, experiment: str) -> dict[str, float]:
    """The newest parent run's ``time_*_s`` metrics in ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id], "tags.`mlflow.parentRunId` IS NULL", order_by=["start_time DESC"]
    )
    for run in runs:
        times = {k: v for k, v in run.data.metrics.items() if k.startswith("time_")}
        if times:
            return {
                k.removeprefix("time_").removesuffix("_s"): round(v, 1) for k, v in times.items()
            }
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    p.add_argument("--keep", default=None, help="run directory and store here (default: temp)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the pipeline")
    args = p.parse_args()
    from rarn import load_config

    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="rarn-first-run-") as tmp:
        base = Path(args.keep or tmp).resolve()
        base.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{base}/mlflow.db"
        cmd = [
            sys.executable, str(ROOT / "pipeline/run.py"), "--config", args.config, "--quiet",
            f"run_dir={base}/run", f"tracking.tracking_uri={uri}", *args.overrides,
        ]  # fmt: skip
        load0 = [round(v, 2) for v in os.getloadavg()]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load1 = [round(v, 2) for v in os.getloadavg()]
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
        times = stage_times(uri, cfg.tracking.experiment)
    pipeline_s = times.get("total")
    print(json.dumps({
        "benchmark": "first_run",
        "config": os.path.relpath(args.config, ROOT),
        "overrides": args.overrides,
        "exit_status": proc.returncode,
        "stage_s": times,
        "command_wall_s": round(wall, 1),
        "goal_pipeline_s": GOAL_S,
        "goal_met": None if pipeline_s is None else pipeline_s <= GOAL_S,
        "cpus": os.cpu_count(),
        "loadavg_start": load0,
        "loadavg_end": load1,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
