"""Transfer stage (``evaluation.transfer``, optional): the source x target matrix of the models.

Adversarial examples crafted on each evaluated model are evaluated on every other one
(:func:`rarn.robust.evaluation.transfer_matrix`): a model that resists its own white-box attack
(the diagonal) but falls to examples crafted on another one masks its gradients. It runs once
every model is evaluated, in one Ray task that loads every model back from MLflow (its sha256
checked first, as the evaluation does), with the suite's PGD (its first ``pgd`` entry: eps, step
size, steps, random start) on the first ``evaluation.transfer_n`` test images. The table
``transfer.parquet`` (:data:`~rarn.robust.evaluation.TRANSFER_SCHEMA`) and its heatmap
``transfer.png`` are written atomically into ``<run_dir>/evaluation/`` and logged to the
pipeline's parent run under ``transfer/`` (sha256 recorded as ``rarn.sha256.transfer/<file>``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.cluster import idle_cpu_share, use_assigned_cpus
from pipeline.model_store import load_model_checked
from pipeline.state import RetrainOutcome, TransferOutcome
from pipeline.tracking import ChildRun, Tracking
from rarn.config import EvaluationConfig, TuneConfig
from rarn.data import as_tensors
from rarn.robust.evaluation import (
    SuiteSettings,
    plot_transfer_heatmap,
    transfer_matrix,
    write_results,
)

__all__ = ["ARTIFACT_DIR", "PLOT", "TABLE", "run_transfer_stage", "transfer_attack"]

log = logging.getLogger(__name__)

TABLE, PLOT = "transfer.parquet", "transfer.png"
ARTIFACT_DIR = "transfer"
"""Artifact folder of both files on the parent run."""


def transfer_attack(ev: EvaluationConfig) -> dict[str, Any]:
    """Keyword arguments of the matrix's PGD: those of the suite's first ``pgd`` entry (its own
    eps, step size, steps and options), else the suite's shared eps, step size and steps."""
    named = SuiteSettings.from_config(ev).attacks
    pgd = next((a for a in named if a.attack == "pgd"), None)
    if pgd is not None:
        return dict(pgd.params)
    return {"eps": ev.eps, "step_size": ev.step_size, "steps": ev.steps}


@ray.remote
def _transfer(
    models: list[RetrainOutcome], tracking: Tracking, bundle: Any, ev: EvaluationConfig, out: str
) -> TransferOutcome:
    """Ray task: load every model (sha256-checked), run the matrix, write and log both files."""
    keys = [m.key for m in models]
    try:
        use_assigned_cpus()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        nets = {m.key: load_model_checked(tracking, m.model_uri, m.model_sha256).to(device)
                for m in models}  # fmt: skip
        x, y = as_tensors(bundle.test)  # Ray resolved the reference (zero-copy)
        n = ev.transfer_n or len(y)
        p = transfer_attack(ev)
        shared = {k: p.pop(k) for k in ("eps", "step_size", "steps")}
        table = transfer_matrix(
            nets, (x[:n], y[:n]), attack="pgd", **shared, attack_kwargs=p,
            generator=torch.Generator(device=device).manual_seed(ev.seed),
            batch_size=ev.batch_size,
        )  # fmt: skip
        parquet = write_results(table, Path(out) / TABLE)
        png = plot_transfer_heatmap(table, Path(out) / PLOT)
        parent = ChildRun(tracking, tracking.parent_run_id)
        for path in (parquet, png):
            parent.log_artifact_checked(path, ARTIFACT_DIR)
    except Exception as e:  # reported in the state; the evaluations are already saved
        log.exception("transfer matrix of %s failed", keys)
        return TransferOutcome(keys, error=f"{type(e).__name__}: {e}")
    return TransferOutcome(keys, str(parquet), str(png))


def run_transfer_stage(
    models: Sequence[RetrainOutcome],
    tracking: Tracking,
    bundle: Any,
    ev: EvaluationConfig,
    tune_cfg: TuneConfig,
    *,
    out_dir: Path,
) -> TransferOutcome:
    """The transfer matrix of ``models`` (each with a logged model), in one Ray task with a
    trial's resources; its outcome names the files, or the error."""
    cpus = idle_cpu_share(tune_cfg.cpus_per_trial, 1, gpu=tune_cfg.gpus_per_trial > 0)
    task = _transfer.options(num_cpus=cpus, num_gpus=tune_cfg.gpus_per_trial)
    return ray.get(task.remote(list(models), tracking, bundle, ev, str(out_dir)))
