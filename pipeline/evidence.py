"""What the registry decides on, read from the tracking store: the run directory is a cache.

``state.json`` sits beside the files it describes, so whoever can write one can write the
other. The promotion rule (:mod:`pipeline.promotion`) therefore reads its evidence from the
MLflow runs that recorded it: each retraining's child run (``rarn.role=retrain`` under this
pipeline's parent run) holds its model (``rarn.model_uri``, ``rarn.model_sha256``), its final
validation metrics, and, once evaluated, the evaluation metrics (``eval_*``), the
gradient-masking flags (``rarn.masking.<check>``) and the digests of the evaluated data
(``rarn.eval_data_sha256``) and settings (``rarn.eval_protocol``).

:func:`store_state` rebuilds the retrainings and evaluations from there, and
:func:`store_retrained` the retrainings the evaluation stage loads and logs to. ``state.json``
can only withhold: a retraining or evaluation it does not record as finished is not used, and a
value it records differently from the store is reported and replaced by the store's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pipeline.state import HEADLINE, EvalOutcome, RetrainOutcome, RunState

__all__ = ["store_retrained", "store_state", "version_matches"]

_MASKING = "rarn.masking."


def _flag(value: str) -> bool | None:
    return {"True": True, "False": False}.get(value)


def _retrain(key: str, run: Any) -> RetrainOutcome | None:
    tags, metrics = run.data.tags, run.data.metrics
    if run.info.status != "FINISHED" or not tags.get("rarn.model_uri"):
        return None
    return RetrainOutcome(
        key,
        genotype_sha=tags.get("rarn.genotype_sha", ""),
        search_run_id=tags.get("rarn.search_run_id", ""),
        retrain_run_id=run.info.run_id,
        model_uri=tags["rarn.model_uri"],
        model_sha256=tags.get("rarn.model_sha256"),
        metrics={k: float(v) for k, v in metrics.items() if k.startswith("final_")},
    )


def _evaluation(key: str, run: Any) -> EvalOutcome | None:
    tags, metrics = run.data.tags, run.data.metrics
    worst = metrics.get(HEADLINE)
    if worst is None or not math.isfinite(worst) or "rarn.eval_protocol" not in tags:
        return None
    flags = {k[len(_MASKING) :]: _flag(v) for k, v in tags.items() if k.startswith(_MASKING)}
    return EvalOutcome(
        key,
        metrics={k: float(v) for k, v in metrics.items() if k.startswith("eval_")},
        flags=flags,
        data_sha256=tags.get("rarn.eval_data_sha256", ""),
        protocol=tags["rarn.eval_protocol"],
        robust_mask=tags.get("rarn.eval_robust", ""),
    )


def _differs(cached: EvalOutcome, stored: EvalOutcome) -> list[str]:
    out = []
    a, b = cached.metrics.get(HEADLINE), stored.metrics[HEADLINE]
    if a is None or not math.isclose(float(a), b, rel_tol=0, abs_tol=1e-9):
        out.append(f"{HEADLINE} {a} vs {b:.4f}")
    if cached.raised_flags() != stored.raised_flags():
        out.append(f"masking flags {cached.raised_flags() or 'none'} vs "
                   f"{stored.raised_flags() or 'none'}")  # fmt: skip
    if (cached.data_sha256, cached.protocol) != (stored.data_sha256, stored.protocol):
        out.append("evaluation data or settings digest")
    return out


def _store_retrained(
    state: RunState, tracking: Any
) -> tuple[dict[str, Any], dict[str, RetrainOutcome], list[str]]:
    runs: dict[str, Any] = {}
    for run in tracking.children("retrain"):
        runs.setdefault(run.data.tags.get("rarn.key", ""), run)
    retrain: dict[str, RetrainOutcome] = {}
    notes: list[str] = []
    for key in state.retrain:
        if not state.retrain_done(key):
            continue
        run = runs.get(key)
        stored = None if run is None else _retrain(key, run)
        if stored is None:
            notes.append(f"state.json lists retraining {key} as finished; the tracking store "
                         "has no finished run with a model for it: not used")  # fmt: skip
            continue
        cached = state.retrain[key]
        ids = ("retrain_run_id", "model_uri", "model_sha256")
        if any(getattr(cached, k) != getattr(stored, k) for k in ids):
            notes.append(f"state.json's model of {key} differs from the tracking store's: the "
                         "store's is used")  # fmt: skip
        retrain[key] = stored
    return runs, retrain, notes


def store_retrained(state: RunState, tracking: Any) -> tuple[list[RetrainOutcome], list[str]]:
    """The finished retrainings (in ``state.json``'s order) with their run, model and digest as
    the tracking store recorded them: what the evaluation loads and logs to."""
    _, retrain, notes = _store_retrained(state, tracking)
    return list(retrain.values()), notes


def store_state(state: RunState, tracking: Any) -> tuple[RunState, list[str]]:
    """``state`` with its retrainings and evaluations replaced by the tracking store's records.

    A retraining or evaluation counts only when ``state.json`` lists it as finished *and* the
    store recorded it (the values are the store's); the lines returned say what ``state.json``
    claimed that the store does not back.

    Args:
        state: the run state read from ``state.json``.
        tracking: the :class:`pipeline.tracking.Tracking` of this run's parent run.
    """
    runs, retrain, notes = _store_retrained(state, tracking)
    evaluate: dict[str, EvalOutcome] = {}
    for key in retrain:
        run = runs[key]
        if not state.evaluate_done(key):
            continue
        ev = _evaluation(key, run)
        if ev is None:
            notes.append(f"state.json lists an evaluation of {key}; the tracking store has "
                         "none: not evaluated")  # fmt: skip
            continue
        diff = _differs(state.evaluate[key], ev)
        if diff:
            notes.append(f"state.json's evaluation of {key} differs from the tracking store's "
                         f"({'; '.join(diff)}): the store's is used")  # fmt: skip
        evaluate[key] = dataclasses.replace(ev, results_path=state.evaluate[key].results_path)
    return dataclasses.replace(state, retrain=retrain, evaluate=evaluate), notes


def version_matches(version: Any, best: RetrainOutcome) -> bool:
    """Whether a registered model version holds ``best``'s model (its lineage tags, as
    :meth:`pipeline.stages.Pipeline._lineage` wrote them)."""
    tags = version.tags
    return (tags.get("rarn.retrain_run_id") == best.retrain_run_id
            and tags.get("rarn.model_sha256") == best.model_sha256)  # fmt: skip
