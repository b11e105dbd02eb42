"""Evaluation stage: the attack suite of :mod:`rarn.robust.evaluation` on the held-out test split.

Every retrained model is loaded back from MLflow (its sha256 checked first), evaluated in a Ray
task (several at once), and its results (the summary table ``results.parquet``, the per-image
records ``records.parquet``, the accuracy-vs-eps plot, metrics and the gradient-masking flags as
tags) are logged to its retraining run, together with what the promotion rule
(:mod:`pipeline.promotion`) compares: the sha256 of the evaluated test tensors
(``rarn.eval_data_sha256``) and of the evaluation settings (``rarn.eval_protocol``). The headline
metric ``eval_worst_case_acc`` is the per-image worst case over every attack that ran on an image
(the suite, AutoAttack on its subset, the masking checks' attacks, adaptive attacks), averaged
over all ``eval_worst_case_n`` = ``eval_n`` test images; every accuracy ``eval_<x>_acc`` comes
with its 95 % Wilson interval (``eval_<x>_lo`` / ``eval_<x>_hi``) and its ``eval_<x>_n``, and
the tags say which attacks the headline holds (``rarn.eval_attacks``), which saw only some
images (``rarn.eval_coverage``: "autoattack on 100 of 359") and the per-image headline mask
(``rarn.eval_robust``) that the promotion rule pairs with the champion's. The same
:func:`evaluate_model` serves ``python -m pipeline.registry evaluate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.cluster import idle_cpu_share, use_assigned_cpus
from pipeline.model_store import load_model_checked
from pipeline.state import EvalOutcome, RetrainOutcome
from pipeline.tracking import ChildRun, Tracking
from rarn.config import EvaluationConfig, TuneConfig, config_to_dict
from rarn.data import as_tensors
from rarn.robust.evaluation import (
    SuiteSettings,
    data_sha256,
    evaluate_robustness,
    plot_accuracy_vs_eps,
    records_table,
    worst_case_from_records,
    write_records,
    write_results,
)

__all__ = [
    "data_sha256",
    "evaluate_model",
    "protocol_sha256",
    "run_evaluate_stage",
    "full_set_metrics",
    "summary_metrics",
    "summary_tags",
]

log = logging.getLogger(__name__)

RECORDS = "records.parquet"
"""The per-image records (``rarn.robust.evaluation.RECORDS_SCHEMA``), beside the results."""


def summary_metrics(result: Any) -> dict[str, float]:
    """``eval_clean_acc``, ``eval_<name>_acc`` per attack and the headline ``eval_worst_case_acc``,
    each with its 95 % Wilson interval ``eval_<x>_lo`` / ``eval_<x>_hi`` and its number of images
    ``eval_<x>_n``; ``eval_n`` (all images; the headline's ``eval_worst_case_n``)."""
    out: dict[str, float] = {}
    for key, name in [("clean", "clean"), ("worst_case", "worst_case"),
                      *((a, a) for a in result.robust_accuracy)]:  # fmt: skip
        ci = result.interval(name)
        acc = {"clean": result.clean_accuracy, "worst_case": result.worst_case_accuracy}
        out[f"eval_{key}_acc"] = acc.get(key, result.robust_accuracy.get(key, ci.accuracy))
        out |= {f"eval_{key}_lo": ci.low, f"eval_{key}_hi": ci.high, f"eval_{key}_n": float(ci.n)}
    out["eval_n"] = float(result.n)
    return out | full_set_metrics(result)


def summary_tags(result: Any) -> dict[str, str]:
    """What the headline holds: its attacks, their coverage, the per-image mask (packed), the
    weights' sha256 and each raised flag's outcome after the adaptive attacks."""
    from rarn.robust.evaluation import pack_mask

    ci = result.interval()
    tags = {
        "rarn.eval_attacks": "+".join(result.attacks),
        "rarn.eval_coverage": result.coverage_text() or "every attack on every image",
        "rarn.eval_headline": f"{ci} (AutoAttack on {_aa_n(result)} of {result.n})",
        "rarn.eval_robust": pack_mask(result.robust),
        "rarn.eval_weights_sha256": result.weights_sha256 or "",
    }
    return tags | {f"rarn.masking_outcome.{k}": v for k, v in result.outcomes.items()}


def _aa_n(result: Any) -> int:
    aa = [a for a in result.attacks if result.method(a).startswith("autoattack")]
    return max((result.subset(a) for a in aa), default=0)


def full_set_metrics(result: Any) -> dict[str, float]:
    """``eval_worst_case_full_acc`` (and ``_n``): the worst case over the attacks that ran on
    every image, on all of them, recombined from the per-image records.

    The headline rests on the images every attack saw, so with AutoAttack on the first 20
    images it moves in steps of 0.05; this companion uses all ``eval_n`` images without the
    subset attacks (not a headline: weaker attacks). Empty when no attack ran on a subset, or
    when the records leave an image undetermined (survivors mode).
    """
    full = [a for a in result.attacks if result.subset(a) >= result.n]
    if not full or len(full) == len(result.attacks):
        return {}
    try:
        mask = worst_case_from_records(records_table([result]), attacks=full)[result.model_name]
    except (KeyError, ValueError):
        return {}
    return {"eval_worst_case_full_acc": float(mask.float().mean()),
            "eval_worst_case_full_n": float(len(mask))}  # fmt: skip


_NOT_PROTOCOL = ("transfer", "transfer_n")  # change no number of the evaluation


def protocol_sha256(ev: EvaluationConfig) -> str:
    """sha256 of the evaluation settings that change its numbers: all but the transfer
    matrix's. The batch size is part of it: every attack draws its random numbers per batch
    (CW moved from 86.35 % to 86.07 % with another batch size). So is every entry that runs on
    the earlier ones' survivors (``survivors``, AutoAttack's by default, written or not): its
    accuracy is then robust to it and every earlier attack."""
    settings = {k: v for k, v in config_to_dict(ev).items() if k not in _NOT_PROTOCOL}
    survivors = [a.name for a in SuiteSettings.from_config(ev).attacks if a.survivors]
    if survivors:  # none: the digest of the settings alone, as before the option
        settings["survivors"] = survivors
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
    """Run the suite of ``ev`` on ``data`` (``(x, y)`` tensors); write both Parquet tables and
    (if a curve) a PNG into ``out_dir``.

    Args:
        attacks: registry names replacing the whole suite (``registry evaluate --attacks``).

    Returns:
        ``(RobustnessResult, results parquet path, png path or None)``; the per-image records
        are ``records.parquet`` beside the results.
    """
    settings = SuiteSettings.from_config(ev)
    if attacks:
        main = "pgd" if "pgd" in attacks else attacks[0]
        settings = dataclasses.replace(settings, attacks=tuple(attacks), main_attack=main)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_robustness(
        model.to(device),
        data,
        settings,
        generator=torch.Generator(device=device).manual_seed(ev.seed),
        model_name=name,
    )
    table = result.to_table()
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet = write_results(table, out_dir / "results.parquet")
    write_records(records_table([result]), out_dir / RECORDS)
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
        use_assigned_cpus()
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
                     | {"rarn.eval_data_sha256": data, "rarn.eval_protocol": protocol}
                     | summary_tags(result))  # fmt: skip
        run.log_artifact_checked(parquet, "evaluation")
        run.log_artifact_checked(parquet.parent / RECORDS, "evaluation")
        if png is not None:
            run.log_artifact_checked(png, "evaluation")
    except Exception as e:  # reported per model; the other models' evaluations go on
        log.exception("evaluation of %s failed", retrained.key)
        return EvalOutcome(retrained.key, error=f"{type(e).__name__}: {e}")
    return EvalOutcome(retrained.key, metrics, dict(result.flags), str(parquet),
                       data_sha256=data, protocol=protocol,
                       robust_mask=summary_tags(result)["rarn.eval_robust"])  # fmt: skip


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
    todo = [r for r in retrained if r.error is None and r.model_uri]
    cpus = idle_cpu_share(tune_cfg.cpus_per_trial, len(todo), gpu=tune_cfg.gpus_per_trial > 0)
    task = _evaluate.options(num_cpus=cpus, num_gpus=tune_cfg.gpus_per_trial)
    refs = {r.key: task.remote(r, tracking, bundle, ev, str(out_dir)) for r in todo}
    done = dict(zip(refs, ray.get(list(refs.values()))))
    skipped = "skipped: its retraining logged no model"
    return [done.get(r.key) or EvalOutcome(r.key, error=r.error or skipped) for r in retrained]
