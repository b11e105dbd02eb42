"""The summary a finished run prints: the ranked models, what failed, and where to look next.

One row per retrained model, best first by the one ranking rule (:class:`pipeline.state.Evidence`:
evaluated, unflagged, then the headline worst-case accuracy), with its 95 % interval and n (rows
whose intervals overlap may not differ; the promotion rule decides with a paired test); after
``--stages search``: one row per selected trial. Then the errored trials and failed retrainings,
the parent run, the registered champion, the command that opens the MLflow UI and the run
directory. Built from the run state alone; this module imports neither Ray nor MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.state import HEADLINE, RunState, is_baseline
from pipeline.tracking_uri import redact_uri

__all__ = ["done_message", "stage_times_line", "summary"]

_HEADER = ("rank", "trial", "overrides", "genotype", "clean", "robust [95% CI] n", "pgd",
           "log-Lip", "search run", "retrain run")  # fmt: skip


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _robust(ev: Mapping[str, float]) -> str:
    """The headline with its 95 % Wilson interval and its number of images."""
    acc, lo, hi = ev.get(HEADLINE), ev.get("eval_worst_case_lo"), ev.get("eval_worst_case_hi")
    if acc is None or lo is None or hi is None:
        return _fmt(acc)
    return f"{acc:.3f} [{lo:.3f}, {hi:.3f}] n={int(ev.get('eval_worst_case_n', 0))}"


def _overrides(over: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in over.items()) or "-"


def _rows(state: RunState) -> list[tuple[str, ...]]:
    search = state.search
    ranked = state.ranked()
    rows = []
    for i, o in enumerate(ranked, 1):
        ev, trial = state.eval_metrics(o.key), search.outcome(o.key) if search else None
        rows.append((
            str(i), o.key, "reference" if is_baseline(o.key) else _overrides(
                trial.overrides if trial else {}), o.genotype_sha[:12],
            _fmt(ev.get("eval_clean_acc")), _robust(ev),
            _fmt(ev.get("eval_pgd_acc")), _fmt(o.metrics.get("final_log_lipschitz_upper"), 2),
            o.search_run_id or "-", o.retrain_run_id or "-",
        ))  # fmt: skip
    if not ranked and search:  # --stages search: the selected trials
        for i, key in enumerate(search.selected, 1):
            t = search.outcome(key)
            rows.append((
                str(i), key, _overrides(t.overrides), (t.genotype_sha or "")[:12],
                "-", "-", "-", "-", t.search_run_id or "-", "-",
            ))  # fmt: skip
    return rows


def _paired_top_two(state: RunState, keys: list[str]) -> list[str]:
    """Rank 1 vs rank 2 image by image (exact McNemar), when both have per-image records."""
    from pipeline.promotion import candidate_mask
    from rarn.robust.evaluation import paired_test, unpack_mask

    evs = [state.evaluate.get(k) for k in keys]
    if len(keys) < 2 or any(e is None or e.error for e in evs):
        return []
    try:
        masks = [candidate_mask(e) for e in evs]
    except (OSError, ValueError, KeyError):
        return []
    if any(m is None for m in masks):
        return []
    a, b = (unpack_mask(m) for m in masks)
    if a.shape != b.shape:
        return []
    t = paired_test(a, b)
    verdict = "significant" if t.significant() else "inside the noise"
    return [f"rank 1 vs 2 ({keys[0]} vs {keys[1]}): {t} ({verdict} at 0.05)"]


def stage_times_line(times: Mapping[str, float]) -> str:
    """``time per stage:   search 443 s, retrain 29 s, evaluate 366 s (total 840 s)``."""
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total")
    total = f" (total {times['total']:.0f} s)" if "total" in times else ""
    return f"time per stage:   {parts or '-'}{total}"


def summary(
    state: RunState,
    *,
    experiment: str,
    tracking_uri: str,
    parent_run_id: str,
    run_dir: Path,
    stage_times: Mapping[str, float] | None = None,
) -> str:
    """The table and the pointers, as printed at the end of a run (with ``stage_times``: the
    wall seconds per stage, also logged to the parent run as ``time_<stage>_s``)."""
    rows = [_HEADER, *_rows(state)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines += _paired_top_two(state, [r[1] for r in rows[1:3]])
    errored = [o for o in (state.search.outcomes if state.search else []) if o.error]
    lines += [f"errored trial {o.key} {o.overrides}: {o.error}" for o in errored]
    lines += [f"failed retraining {o.key}: {o.error}" for o in state.retrain.values() if o.error]
    lines.append(f"parent run:       {parent_run_id} (experiment {experiment})")
    reg = state.registered
    if reg is not None:
        verdict = f"@{reg.alias}" if reg.promoted else f"not {reg.alias}"
        why = f": {reg.reason}" if reg.reason else ""
        lines.append(f"registered model: {reg.uri} (version {reg.version}, trial {reg.key}, "
                     f"{verdict}{why})")  # fmt: skip
    uri = tracking_uri
    ui = f"mlflow ui --backend-store-uri {redact_uri(uri)}" if uri.startswith("sqlite") else uri
    lines.append(f"MLflow UI:        {ui}")
    lines.append(f"run directory:    {run_dir}")
    if stage_times:
        lines.append(stage_times_line(stage_times))
    return "\n".join(lines)


def done_message(elapsed_s: float, text: str) -> str:
    """What the CLI prints when every requested stage finished."""
    return f"\n[done] {elapsed_s:.0f} s\n{text}"
