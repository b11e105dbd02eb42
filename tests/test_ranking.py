"""One "best model" rule (issue 18): :class:`pipeline.state.Evidence` ranks the models; the
champion, the report's order and the promotion's evidence all read it."""

from __future__ import annotations

from pathlib import Path

from pipeline.promotion import TAGS, evidence_tags
from pipeline.report import summary
from pipeline.state import HEADLINE, EvalOutcome, Evidence, RetrainOutcome, RunState


def _state() -> RunState:
    state = RunState()
    metrics = {
        "flagged": {HEADLINE: 0.9, "eval_clean_acc": 0.95},
        "plain": {HEADLINE: 0.5, "eval_clean_acc": 0.9, "eval_worst_case_n": 200.0,
                  "eval_worst_case_lo": 0.43, "eval_worst_case_hi": 0.57},
        "tied": {HEADLINE: 0.5, "eval_clean_acc": 0.92},
    }  # fmt: skip
    for key in ("unevaluated", "flagged", "plain", "tied"):
        state.retrain[key] = RetrainOutcome(
            key, "g" * 12, "s", "r", f"uri-{key}", "sha", metrics={"final_val_robust_acc": 0.99}
        )
    for key, m in metrics.items():
        flags = {"black_box_stronger": key == "flagged"}
        state.evaluate[key] = EvalOutcome(key, m, flags, data_sha256="d" * 64, protocol="p")
    return state


def test_evaluated_then_unflagged_then_headline_then_clean() -> None:
    state = _state()
    assert [o.key for o in state.ranked()] == ["tied", "plain", "flagged", "unevaluated"]
    assert state.champion().key == "tied"
    e = state.evidence(state.retrain["plain"])
    assert (e.metric, e.value, e.n, e.interval) == (HEADLINE, 0.5, 200, (0.43, 0.57))
    unevaluated = state.evidence(state.retrain["unevaluated"])
    assert not unevaluated.evaluated and unevaluated.metric == "final_val_robust_acc"


def test_the_report_lists_models_in_the_ranking_order(tmp_path: Path) -> None:
    state = _state()
    text = summary(state, experiment="x", tracking_uri="sqlite:////x.db", parent_run_id="p",
                   run_dir=tmp_path)  # fmt: skip
    rows = [line.split()[1] for line in text.splitlines()[1:5]]
    assert rows == [o.key for o in state.ranked()]


def test_promotion_records_the_headline_the_ranking_uses() -> None:
    state = _state()
    best = state.champion()
    tags = evidence_tags(state.evaluate[best.key])
    assert TAGS["worst"] == f"rarn.{HEADLINE}"
    assert float(tags[TAGS["worst"]]) == Evidence.of(best, state.evaluate[best.key]).value
