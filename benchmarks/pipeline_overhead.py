"""What the Tune search stage costs on top of a bare ``rarn.nas.search.run_search``, and its
throughput.

Runs the same small search (configs/default.yaml's search and constraint, shortened with
``--epochs`` / ``--steps``) once directly in this process and once as a one-trial Tune stage
(the pipeline's trainable: MLflow child run, per-epoch checkpoint commits and ``tune.report``),
both single-threaded as a 1-CPU trial is. Then two trials with at most 1 and at most 2 running
at a time. Prints one JSON line; progress goes to stderr.

    python benchmarks/pipeline_overhead.py                 # ~ minutes on 2 CPUs
    python benchmarks/pipeline_overhead.py --epochs 1 --steps 4  # quick look
    python benchmarks/pipeline_overhead.py --cluster       # the three-node cluster (root)

``--cluster`` instead times the smoke pipeline (configs/smoke.yaml, all stages) run locally
(``python pipeline/run.py``, its own loopback Ray) and submitted with ``ray job submit`` to the
three-node test cluster of ``tests/netns_cluster.py`` (shared run_dir and storage, MLflow server
on the head), and the time that cluster takes to come up and to go down.

The ratio's goal (<= 1.10) is for a multi-minute job: the Tune stage adds a roughly fixed cost
(worker start, imports, MLflow run), reported as ``fixed_overhead_s``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.env import apply_env_defaults

apply_env_defaults(testing=True)  # before importing ray

import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.search import SearchJob, build_tuner  # noqa: E402
from pipeline.tracking import prepare_tracking  # noqa: E402
from rarn import (  # noqa: E402
    SearchData,
    load_config,
    load_dataset,
    run_search,
)

ROOT = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cluster_benchmark() -> dict:
    """Smoke pipeline locally vs submitted to the three-node cluster; cluster up/down times."""
    import subprocess

    sys.path.insert(0, str(ROOT / "tests"))
    from netns_cluster import NetnsCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        return {"benchmark": "pipeline_overhead_cluster", "skipped": reason}
    with tempfile.TemporaryDirectory() as tmp:
        _say("[bench] smoke pipeline, local Ray instance")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, str(ROOT / "pipeline/run.py"), "--config",
               str(ROOT / "configs/smoke.yaml"), "--quiet", f"run_dir={tmp}/local"]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True, timeout=1200)
        local = time.perf_counter() - t0
    _say("[bench] three-node cluster: up")
    t0 = time.perf_counter()
    cluster = NetnsCluster.up()
    up = time.perf_counter() - t0
    job = None
    try:
        _say("[bench] smoke pipeline, ray job submit to the cluster")
        run = cluster.shared / "runs/bench"
        t0 = time.perf_counter()
        job = cluster.submit("--config", "configs/smoke.yaml", f"run_dir={run}",
                             f"tune.storage_path={cluster.shared}/ray", job_id="bench")  # fmt: skip
        job.wait(timeout=1200)
        submitted = time.perf_counter() - t0
        status = cluster.job_status("bench")
    finally:
        if job is not None and job.poll() is None:
            job.kill()  # the submit client, when the job did not end in time
        t0 = time.perf_counter()
        cluster.down()
        down = time.perf_counter() - t0
    return {
        "benchmark": "pipeline_overhead_cluster",
        "config": "smoke.yaml",
        "local_s": round(local, 1),
        "cluster_submitted_s": round(submitted, 1),
        "cluster_job_status": status,
        "ratio": round(submitted / local, 2),
        "cluster_up_s": round(up, 1),
        "cluster_down_s": round(down, 1),
        "nodes": "head (0 CPU) + 2 workers (1 CPU each)",
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="max steps per epoch (0: full D_T)")
    p.add_argument("--cluster", action="store_true", help="the three-node cluster benchmark")
    args = p.parse_args()
    if args.cluster:
        print(json.dumps(cluster_benchmark()))
        return
    cfg = load_config(args.config, [f"search.epochs={args.epochs}",
                                    f"search.max_steps_per_epoch={args.steps}",
                                    f"search.warmup_epochs={min(1, args.epochs - 1)}"])  # fmt: skip
    bundle = load_dataset(cfg.data)
    data = SearchData.from_bundle(bundle, cfg.data.train_portion, cfg.data.seed)

    _say(f"[bench] direct run_search: {args.epochs} epochs, 1 thread")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a 1-CPU trial gets (Ray sets OMP_NUM_THREADS=1)
    t0 = time.perf_counter()
    run_search(cfg.search, cfg.constraint, data)
    direct = time.perf_counter() - t0
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip
        ray_init = time.perf_counter() - t0

        def stage(name: str, points: list[dict], max_concurrent: int) -> float:
            run_dir = Path(tmp) / name
            t = replace(cfg.tune, max_concurrent=max_concurrent, max_failures=0)
            c = replace(cfg, run_dir=str(run_dir), tune=t)
            uri = f"sqlite:///{tmp}/mlflow.db"
            tracking = prepare_tracking(c, uri=uri, run_dir=run_dir, fingerprint=bundle.fingerprint)
            job = SearchJob(c, tracking, str(run_dir))
            storage = str(run_dir / "ray")
            tuner = build_tuner(c, data, job, storage_path=storage, points=points, verbose=0)
            t0 = time.perf_counter()
            results = tuner.fit()
            wall = time.perf_counter() - t0
            assert not results.errors, results.errors
            return wall

        _say("[bench] the same search as a one-trial Tune stage")
        seed = cfg.search.seed
        tune_s = stage("one", [{"key": "t00", "search.seed": seed}], 1)
        two = [{"key": f"t{i:02d}", "search.seed": seed + i} for i in range(2)]
        _say("[bench] 2 trials, at most 1 at a time")
        seq = stage("seq", two, 1)
        _say("[bench] 2 trials, at most 2 at a time")
        par = stage("par", two, 2)
        ray.shutdown()

    print(json.dumps({
        "benchmark": "pipeline_overhead",
        "config": Path(args.config).name,
        "epochs": args.epochs,
        "max_steps_per_epoch": args.steps,
        "direct_s": round(direct, 2),
        "tune_stage_s": round(tune_s, 2),
        "ratio": round(tune_s / direct, 3),
        "fixed_overhead_s": round(tune_s - direct, 2),
        "ray_init_s": round(ray_init, 2),
        "throughput": {
            "trials": 2,
            "concurrency_1": {"wall_s": round(seq, 2), "trials_per_min": round(120 / seq, 3)},
            "concurrency_2": {"wall_s": round(par, 2), "trials_per_min": round(120 / par, 3)},
            "speedup": round(seq / par, 3),
        },
        "cpus": os.cpu_count(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
