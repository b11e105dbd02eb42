"""Retraining stage: each selected genotype is adversarially retrained by a Ray Train trainer.

One ``TorchTrainer`` per genotype (DDP over ``tune.retrain_workers`` workers, gloo on CPU, NCCL
on GPU), each launched from a zero-CPU Ray task so several genotypes train concurrently when the
cluster has room. With one worker (the default) there is nothing to distribute: the same loop
runs in a plain Ray task with the worker's resources and ``max_failures`` retries, resuming from
rank 0's commits, without Ray Train's start-up (its controller and helper actors).

The worker loop is a thin adapter around :func:`rarn.robust.retrain.run_retrain` with numbered
Ray touch-points: data by reference from the object store, resume from
``ray.train.get_checkpoint()`` or rank 0's newer local commit (every rank from the same epoch),
DDP through ``prepare_model`` and a ``DistributedSampler`` share reshuffled every epoch, a
per-epoch ``ray.train.report`` with rank 0's checkpoint, and ``FailureConfig`` retries. Ray
Train run names carry the pipeline's parent run id, so runs sharing a storage path never meet.
Rank 0 owns the MLflow child run (tags ``rarn.search_run_id`` and ``rarn.genotype_sha`` point
back to the search) and logs the selected model with its sha256.

A job may retrain a named network of :data:`rarn.models.baselines.BASELINES` (a reference such as
``resnet18``) instead of a genotype: same data, epochs, attack and selection, without the
DARTS-only auxiliary head and drop-path; its architecture digest is
:func:`rarn.models.baselines.baseline_sha256`, and its run has the tag ``rarn.network`` and no
``genotype.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.checkpoints import PROGRESS, CheckpointCorrupted, TrialStore
from pipeline.cluster import idle_cpu_share, use_assigned_cpus
from pipeline.model_store import log_model_checked
from pipeline.state import RetrainOutcome
from pipeline.tracking import ChildRun, Tracking, allowed_params
from rarn.checkpoint import atomic_write
from rarn.config import RetrainConfig, TuneConfig, config_to_dict
from rarn.models.baselines import baseline_sha256
from rarn.robust.retrain import run_retrain
from rarn.space.genotype import Genotype

__all__ = ["RetrainJob", "retrain_loop", "run_retrain_stage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainJob:
    """One architecture to retrain and where its lineage points: a genotype, or a named network
    of :data:`rarn.models.baselines.BASELINES` (``network``; then ``genotype`` is None)."""

    key: str  # the search trial's key, the bundled genotype's name, or ref-<name>
    genotype: Genotype | None
    cfg: RetrainConfig
    tracking: Tracking
    run_dir: str
    search_run_id: str = ""  # empty for a bundled genotype (no search lineage)
    network: str = ""  # a BASELINES name, trained instead of a genotype

    def __post_init__(self) -> None:
        if (self.genotype is None) == (not self.network):
            raise ValueError(f"retrain job {self.key}: give a genotype or a network name")

    @classmethod
    def of(cls, key: str, architecture: Genotype | str, **kwargs: Any) -> RetrainJob:
        """A job for a genotype, or for a named network (a ``BASELINES`` key)."""
        if isinstance(architecture, str):
            return cls(key, None, network=architecture, **kwargs)
        return cls(key, architecture, **kwargs)

    @property
    def architecture_sha(self) -> str:
        """The genotype's sha256, or a named network's :func:`~rarn.models.baselines.
        baseline_sha256` (``RetrainOutcome.genotype_sha``, the ``rarn.genotype_sha`` tag)."""
        if self.genotype is not None:
            return self.genotype.sha256()
        return baseline_sha256(self.network)

    @property
    def run_name(self) -> str:
        """``retrain-<key>-<parent run id>``: unique per pipeline run in a shared storage path;
        the same on ``--resume``, which continues this Ray Train run."""
        run_id = self.tracking.parent_run_id
        return f"retrain-{self.key}-{run_id[:12]}" if run_id else f"retrain-{self.key}"

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "retrain" / self.key

    def store(self, rank: int) -> TrialStore:
        return TrialStore(self.root / f"rank{rank}", Path(self.run_dir))

    def trained_config(self) -> RetrainConfig:
        """The section as this job trains it: a named network in ``genotype``, without the
        auxiliary head and drop-path (DARTS networks only; every other setting is shared)."""
        if self.genotype is not None:
            return self.cfg
        return dataclasses.replace(
            self.cfg, genotype=self.network, auxiliary_weight=0.0, drop_path=0.0
        )

    def worker_config(self, world: int) -> RetrainConfig:
        """The per-worker section: the genotype as a JSON file (a named network by its name),
        the batch split over ranks."""
        cfg = self.trained_config()
        if self.genotype is not None:
            path, text = self.root / "genotype.json", self.genotype.to_json()
            if not path.is_file() or path.read_text() != text:
                atomic_write(path, text)  # other ranks may be reading it
            cfg = dataclasses.replace(cfg, genotype=str(path))
        return dataclasses.replace(cfg, batch_size=max(1, cfg.batch_size // world))

    def open_run(self) -> ChildRun:
        tags = {
            "rarn.search_run_id": self.search_run_id,
            "rarn.genotype_sha": self.architecture_sha,
            "rarn.genotype_source": self.key,
        }
        if self.network:
            tags["rarn.network"] = self.network
        params = allowed_params({"retrain": config_to_dict(self.trained_config())})
        return self.tracking.child_run("retrain", self.key, params=params, tags=tags)


def retrain_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: one genotype's adversarial retraining (one DDP rank)."""
    use_assigned_cpus()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # [1] Data: one copy in the object store, shared by every worker on a node.
    (bundle,) = ray.get(config["bundle"])

    def report(metrics: dict[str, float], commit: Path | None) -> None:
        checkpoint = None if commit is None else ray.train.Checkpoint.from_directory(str(commit))
        ray.train.report(metrics, checkpoint=checkpoint)

    wrap = ray.train.torch.prepare_model if world > 1 else None
    _train_rank(config["job"], bundle, rank, world, ray.train.get_checkpoint(), report,
                ray.train.torch.get_device(), wrap)  # fmt: skip


def _train_rank(
    job: RetrainJob,
    bundle: Any,
    rank: int,
    world: int,
    reported: Any,
    report_to_ray: Callable[[dict[str, float], Path | None], None],
    device: torch.device,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None,
) -> None:
    """One rank of one job's retraining, Ray Train worker or single-worker task alike:
    ``reported`` is the checkpoint Ray hands back (None for a task: rank 0's own commits are
    the resume point), ``report_to_ray(metrics, commit)`` passes each epoch on (rank 0 with its
    committed folder)."""
    store, run = job.store(rank), (job.open_run() if rank == 0 else None)
    commits = _recorded_commits(job, run)

    def record(digest: str) -> None:  # rank 0, before the commit appears (TrialStore.commit)
        commits[:] = run.record_commit(commits, digest)

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        commit = None
        if rank == 0:  # [3] Every rank reports; rank 0 commits and attaches its checkpoint.
            commit = store.commit(epoch, extra={"metrics": dict(metrics)}, record=record)
            run.log_metrics(metrics, step=epoch)
        report_to_ray(dict(metrics), commit)

    with run.failing_on_error() if run is not None else contextlib.nullcontext():
        # [2] Resume from Ray Train's checkpoint (retry/restore) or rank 0's newer local commit:
        # every rank from the same epoch.
        source = _resume_source(job, rank, reported)
        progress = store.restore(source, f"retraining {job.key} r{rank}", commits)
        store.record_attempt(
            run.resumed(progress) if run else int((progress or {}).get("epoch", 0))
        )
        # [4] DDP: prepare_model wraps the network for the training steps; ranks train shards.
        result = run_retrain(
            job.worker_config(world), bundle, callbacks=[report], checkpoint_dir=store.work,
            device=device, wrap_model=wrap, shard=(rank, world),
        )  # fmt: skip
        if run is not None:
            example = torch.stack([bundle.test[i][0] for i in range(min(2, len(bundle.test)))])
            _log_result(job, run, result, example)


def _recorded_commits(job: RetrainJob, run: ChildRun | None) -> list[str] | None:
    """The commits rank 0's run recorded in the tracking store (every rank resumes from rank
    0's commit); None when that run does not exist yet (nothing to resume from then)."""
    if run is not None:
        return run.commit_digests()
    run_id = job.tracking.find_child("retrain", job.key)
    return None if run_id is None else ChildRun(job.tracking, run_id).commit_digests()


@dataclass(frozen=True)
class _Commit:
    """A committed folder, handed to :meth:`TrialStore.restore` like Ray's checkpoint."""

    path: Path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield str(self.path)


def _epoch_of(checkpoint: Any) -> int:
    with checkpoint.as_directory() as d:
        try:
            return int(json.loads((Path(d) / PROGRESS).read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return -1


def _resume_source(job: RetrainJob, rank: int, reported: Any) -> Any:
    """Where a rank resumes from: the newer of Ray Train's checkpoint and rank 0's last commit.

    Only rank 0 commits (in ``<run_dir>``, shared by every node), and every rank resumes from
    the same commit: ranks that resumed from different epochs would run different numbers of
    steps, and the last all-reduce of the shorter one would wait forever (seen with a worker
    node killed between rank 0's commit and the others' reports). DDP keeps the ranks' weights
    and optimiser states equal, so rank 0's checkpoint is every rank's.
    """
    if rank == 0:  # TrialStore.restore also looks at rank 0's own commits
        return reported
    local = job.store(0).latest()
    if local is None:
        return reported
    if reported is None or _epoch_of(_Commit(local)) >= _epoch_of(reported):
        return _Commit(local)
    return reported


def _log_result(job: RetrainJob, run: ChildRun, result: Any, example: Any) -> None:
    """Rank 0: final metrics, genotype (if any) and model (sha256-recorded); the run ends
    FINISHED."""
    run.log_metrics({f"final_{k}": v for k, v in result.final.items()}, step=result.best_epoch)
    run.set_tags({"rarn.selected_by": result.selected_by})
    if job.genotype is not None:  # a named network has no genotype (its name is a tag)
        run.log_artifact_checked(job.root / "genotype.json")
    model = result.model.cpu().eval()
    log_model_checked(job.tracking, run.run_id, model, example, network=job.network)
    run.end("FINISHED")


@ray.remote(num_cpus=0)
def _fit(job: RetrainJob, bundle: Any, tune_cfg: TuneConfig, storage_path: str) -> str | None:
    """Launcher task: build and fit one ``TorchTrainer``; returns an error text or None."""
    use_gpu = tune_cfg.retrain_use_gpu
    per_worker = {"CPU": tune_cfg.retrain_cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        retrain_loop,
        train_loop_config={"job": job, "bundle": bundle},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tune_cfg.retrain_workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=tune_cfg.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception
        return _error_text(e)
    return None


@ray.remote
def _fit_single(job: RetrainJob, bundle: Any) -> None:
    """One worker, no process group: the retraining runs in this task (resources, retries and
    GPU set by :func:`_launch`); it resumes from rank 0's last commit on a retry or --resume."""
    use_assigned_cpus()
    (data,) = ray.get(bundle)
    device = torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")
    _train_rank(job, data, 0, 1, None, lambda metrics, commit: None, device, None)


def _error_text(e: BaseException) -> str:
    """The line of a (wrapped) worker exception that names the error."""
    text = str(e).strip().splitlines()
    return next((ln for ln in reversed(text) if "Error" in ln), text[-1] if text else "error")


def _launch(job: RetrainJob, bundle: Any, tune_cfg: TuneConfig, storage_path: str) -> Any:
    """A ``TorchTrainer`` for ``tune.retrain_workers`` > 1; one worker is a plain Ray task with
    the same resources and ``max_failures`` retries (a node lost or an error raised), which
    skips Ray Train's controller, placement group and helper actors (about 12 s of start-up
    per job on 2 CPUs, docs/benchmarks.md) and has no process group to set up."""
    if tune_cfg.retrain_workers > 1:
        return _fit.remote(job, bundle, tune_cfg, storage_path)
    gpu = tune_cfg.retrain_use_gpu
    return _fit_single.options(
        num_cpus=tune_cfg.retrain_cpus_per_worker,
        num_gpus=1 if gpu else 0,
        max_retries=tune_cfg.max_failures,
        retry_exceptions=True,
    ).remote(job, bundle)


def _wait(ref: Any) -> str | None:
    """A launched job's error text, or None."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:  # the task's error, or its node or worker lost for good
        return _error_text(e)


def _outcome(job: RetrainJob, error: str | None) -> RetrainOutcome:
    o = RetrainOutcome(job.key, job.architecture_sha, job.search_run_id, error=error)
    o.retrain_run_id = job.tracking.find_child("retrain", job.key)
    if o.retrain_run_id is None:
        return o
    client = job.tracking.client()
    run = client.get_run(o.retrain_run_id)
    if run.info.status == "RUNNING":  # a worker died before it could end its run
        client.set_terminated(o.retrain_run_id, status="FAILED" if error else "FINISHED")
    o.model_uri = run.data.tags.get("rarn.model_uri")
    o.model_sha256 = run.data.tags.get("rarn.model_sha256")
    o.metrics = {k: float(v) for k, v in run.data.metrics.items() if k.startswith("final_")}
    if error is None and o.model_uri is None:
        o.error = "no model was logged"
    return o


def run_retrain_stage(
    jobs: Sequence[RetrainJob],
    bundle: Any,
    tune_cfg: TuneConfig,
    *,
    storage_path: str,
    progress_every_s: float = 15.0,
    echo: Any = print,
) -> list[RetrainOutcome]:
    """Retrain every job concurrently (as resources allow); one outcome per job, in order.

    Args:
        jobs: the genotypes to retrain.
        bundle: ``ray.put(DatasetBundle)``.
        tune_cfg: workers, GPUs, CPUs per worker, max failures.
        storage_path: Ray Train storage (a retraining of the same name resumes there).
        progress_every_s: how often to print each job's last epoch (from its local commits).
        echo: where progress lines go.
    """
    share = idle_cpu_share(
        tune_cfg.retrain_cpus_per_worker,
        len(jobs) * tune_cfg.retrain_workers,
        gpu=tune_cfg.retrain_use_gpu,
    )  # the CPUs the other jobs leave idle
    tune_cfg = dataclasses.replace(tune_cfg, retrain_cpus_per_worker=share)
    # In a list, the reference reaches the workers unresolved: one copy in the object store.
    refs = [_launch(job, [bundle], tune_cfg, storage_path) for job in jobs]
    pending, last = list(refs), 0.0
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        if pending and time.monotonic() - last > progress_every_s:
            last = time.monotonic()
            for job in jobs:
                echo(f"[retrain] {job.key}: {_progress_line(job)}")
    errors = [_wait(ref) for ref in refs]
    return [_outcome(job, err) for job, err in zip(jobs, errors)]


def _progress_line(job: RetrainJob) -> str:
    try:
        latest = job.store(0).latest()
        if latest is None:
            return "starting"
        p = json.loads((latest / PROGRESS).read_text())
    except (OSError, ValueError, CheckpointCorrupted) as e:  # the trial itself reports it
        return f"progress unreadable ({type(e).__name__})"
    m = p.get("metrics", {})
    acc = "".join(f", {k} {m[k]:.3f}" for k in ("train_acc", "val_robust_acc") if k in m)
    return f"epoch {p['epoch']}/{job.cfg.epochs}{acc}"
