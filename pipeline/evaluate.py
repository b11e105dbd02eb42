"""Evaluation stage: the attack suite of :mod:`rarn.robust.evaluation` on the held-out test split.

Every retrained model is loaded back from MLflow (its sha256 checked first), evaluated in a Ray
task (several at once), and its results (Parquet table, accuracy-vs-eps plot, metrics and the
gradient-masking flags as tags) are logged to its retraining run, together with what the
promotion rule (:mod:`pipeline.promotion`) compares: the sha256 of the evaluated test tensors
(``rarn.eval_data_sha256``) and of the evaluation settings (``rarn.eval_protocol``). The same
:func:`evaluate_model` serves ``python -m pipeline.registry evaluate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.model_store import load_model_checked
from pipeline.state import EvalOutcome, RetrainOutcome
from pipeline.tracking import ChildRun, Tracking
from rarn.config import EvaluationConfig, TuneConfig, config_to_dict
from rarn.data import as_tensors
from rarn.robust.evaluation import evaluate_robustness, plot_accuracy_vs_eps, write_results

__all__ = [
    "data_sha256",
    "evaluate_model",
    "protocol_sha256",
    "run_evaluate_stage",
    "summary_metrics",
]

log = logging.getLogger(__name__)


def summary_metrics(result: Any) -> dict[str, float]:
    """``eval_clean_acc``, ``eval_<attack>_acc`` per attack, ``eval_worst_case_acc``."""
    out = {"eval_clean_acc": result.clean_accuracy}
    out["eval_worst_case_acc"] = result.worst_case_accuracy
    out |= {f"eval_{a}_acc": v for a, v in result.robust_accuracy.items()}
    return out


def data_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the evaluated data: shapes, dtypes and bytes of the images and labels."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def protocol_sha256(ev: EvaluationConfig) -> str:
    """sha256 of the evaluation settings that change its numbers (all but the batch size)."""
    settings = {k: v for k, v in config_to_dict(ev).items() if k != "batch_size"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def evaluate_model(
    model: torch.nn.Module,
    data: Any,
    ev: EvaluationConfig,
    *,
    name: str,
    out_dir: Path,
    attacks: Sequence[str] | None = None,
) -> tuple[Any, Path, Path | None]:
    """Run the suite on ``data`` (``(x, y)`` tensors); write Parquet and (if a curve) a PNG.

    Returns:
        ``(RobustnessResult, parquet path, png path or None)``.
    """
    suite = tuple(attacks or ev.attacks) + (("autoattack",) if ev.autoattack else ())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_robustness(
        model.to(device),
        data,
        attacks=suite,
        eps=ev.eps,
        step_size=ev.step_size,
        steps=ev.steps,
        eps_curve=ev.eps_curve,
        generator=torch.Generator(device=device).manual_seed(ev.seed),
        model_name=name,
        batch_size=ev.batch_size,
        main_attack="pgd" if "pgd" in suite else suite[0],
        checks=ev.checks,
        black_box_queries=ev.black_box_queries,
    )
    table = result.to_table()
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet = write_results(table, out_dir / "results.parquet")
    png = None
    if len(result.curve) >= 2:
        png = plot_accuracy_vs_eps(table, out_dir / "accuracy_vs_eps.png")
    return result, parquet, png


@ray.remote
def _evaluate(
    retrained: RetrainOutcome, tracking: Tracking, bundle: Any, ev: EvaluationConfig, out: str
) -> EvalOutcome:
    """Ray task: load (sha256-checked), evaluate, log to the retraining run."""
    try:
        model = load_model_checked(tracking, retrained.model_uri, retrained.model_sha256)
        x, y = as_tensors(bundle.test)  # Ray resolved the reference (zero-copy)
        result, parquet, png = evaluate_model(
            model, (x, y), ev, name=retrained.key, out_dir=Path(out) / retrained.key
        )
        run = ChildRun(tracking, retrained.retrain_run_id)
        metrics = summary_metrics(result)
        run.log_metrics(metrics, step=0)
        data, protocol = data_sha256(x, y), protocol_sha256(ev)
        run.set_tags({f"rarn.masking.{k}": v for k, v in result.flags.items()}
                     | {"rarn.eval_data_sha256": data, "rarn.eval_protocol": protocol})  # fmt: skip
        run.log_artifact_checked(parquet, "evaluation")
        if png is not None:
            run.log_artifact_checked(png, "evaluation")
    except Exception as e:  # reported per model; the other models' evaluations go on
        log.exception("evaluation of %s failed", retrained.key)
        return EvalOutcome(retrained.key, error=f"{type(e).__name__}: {e}")
    return EvalOutcome(retrained.key, metrics, dict(result.flags), str(parquet),
                       data_sha256=data, protocol=protocol)  # fmt: skip


def run_evaluate_stage(
    retrained: Sequence[RetrainOutcome],
    tracking: Tracking,
    bundle: Any,
    ev: EvaluationConfig,
    tune_cfg: TuneConfig,
    *,
    out_dir: Path,
) -> list[EvalOutcome]:
    """Evaluate every retrained model, concurrently; one outcome per model, in order (a model
    that cannot be evaluated, for want of a logged model, gets an outcome with its error)."""
    task = _evaluate.options(num_cpus=tune_cfg.cpus_per_trial, num_gpus=tune_cfg.gpus_per_trial)
    refs = {
        r.key: task.remote(r, tracking, bundle, ev, str(out_dir))
        for r in retrained
        if r.error is None and r.model_uri
    }
    done = dict(zip(refs, ray.get(list(refs.values()))))
    skipped = "skipped: its retraining logged no model"
    return [done.get(r.key) or EvalOutcome(r.key, error=r.error or skipped) for r in retrained]
