"""Study mode's last step: the per-variant table from what the stages recorded, into MLflow.

The searches, retrainings and evaluations of a study are the pipeline's ordinary stages (the
trials are :func:`pipeline.trials.trial_points`' variants x seeds, the random genotypes are
reference networks of :meth:`pipeline.stages.Pipeline.baselines`). This module reads their
outcomes from the run state, builds the tables of :mod:`rarn.study`, writes them to
``<run_dir>/study/`` (``runs.parquet``, ``summary.parquet``, ``summary.md``, ``study.png``)
and logs them to the parent run under ``study/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.state import BASELINE_PREFIX, RunState
from pipeline.trials import VARIANT, with_overrides
from rarn.checkpoint import atomic_path, atomic_write
from rarn.config import Config
from rarn.models.baselines import BASELINES
from rarn.nas.genotype import Genotype
from rarn.nas.variants import RANDOM_PREFIX, random_seed_of
from rarn.study import plot_study, run_row, runs_table, summarise, to_markdown

__all__ = ["study_rows", "write_study"]

_CONSTRAINT_ONLY = ("frac_satisfied", "y")
FILES = ("runs.parquet", "summary.parquet", "summary.md", "study.png")


def study_rows(cfg: Config, state: RunState, run_dir: Path) -> list[dict[str, Any]]:
    """One row per retrained model: searched trials under their variant, ``random-<seed>``
    references under ``random``, other references under ``ref:<name>`` (their genotype as their
    retraining wrote it, ``<run_dir>/retrain/<key>/genotype.json``; a named network such as
    ``resnet18`` has none: no op histogram, no collapse signals)."""
    rows = []
    search = state.search
    for o in state.retrained():
        ev = state.eval_metrics(o.key) or None
        trial = search.outcome(o.key) if search is not None else None
        if trial is not None and trial.genotype is not None:
            variant = str(trial.overrides.get(VARIANT, "searched"))
            seed = int(trial.overrides.get("search.seed", cfg.search.seed))
            search_metrics = dict(trial.metrics)
            if not with_overrides(cfg, trial.overrides).constraint.enabled:
                # an unconstrained search still reports h and y (monitoring): not activity
                for k in _CONSTRAINT_ONLY:
                    search_metrics.pop(k, None)
            rows.append(_row(variant, seed, o.key, trial.genotype, search_metrics, ev))
            continue
        name = o.key.removeprefix(BASELINE_PREFIX)
        seed = random_seed_of(name)
        variant = RANDOM_PREFIX.rstrip("-") if seed is not None else f"ref:{name}"
        genotype = None
        if name not in BASELINES:
            path = Path(run_dir) / "retrain" / o.key / "genotype.json"
            genotype = Genotype.from_json(path.read_text())
        rows.append(_row(variant, seed or 0, o.key, genotype, None, ev, o.genotype_sha))
    return rows


def _row(
    variant: str, seed: int, key: str, genotype: Any, search: Any, ev: Any, sha: Any = None
) -> dict:
    return run_row(variant=variant, seed=seed, key=key, genotype=genotype, search=search,
                   evaluation=ev, genotype_sha=sha)  # fmt: skip


def write_study(cfg: Config, state: RunState, run_dir: Path, tracking: Any) -> str:
    """Write the study's files and log them to the parent run; returns the Markdown table."""
    runs = runs_table(study_rows(cfg, state, run_dir))
    order = [*cfg.study.variants, "random"]
    summary = summarise(runs, order)
    out = Path(run_dir) / "study"
    out.mkdir(parents=True, exist_ok=True)
    for table, name in ((runs, "runs.parquet"), (summary, "summary.parquet")):
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    text = to_markdown(summary)
    atomic_write(out / "summary.md", text + "\n")
    plot_study(summary, out / "study.png")
    client = tracking.client()
    for name in FILES:
        client.log_artifact(tracking.parent_run_id, str(out / name), "study")
    return text
