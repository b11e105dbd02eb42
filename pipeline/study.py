"""Study mode's last step: the per-variant table from what the stages recorded, into MLflow.

The searches, retrainings and evaluations of a study are the pipeline's ordinary stages (the
trials are :func:`pipeline.trials.trial_points`' variants x seeds, the random genotypes are
reference networks of :meth:`pipeline.stages.Pipeline.baselines`). This module reads their
outcomes from the run state, builds the tables of :mod:`rarn.study`, writes them to
``<run_dir>/study/`` (``runs.parquet``, ``runs.csv``, ``summary.parquet``, ``summary.md``,
``study.png``) and logs them to the parent run under ``study/``.

``runs.csv`` is the auditable record, meant to be committed (copied to ``docs/study/``; the
Parquet files stay ignored): per network its variant, seed, genotype JSON, clean and per-attack
accuracies, worst cases, number of test images, the digests of the data each stage used and the
per-image worst case (:func:`rarn.study.csv_row`); ``examples/study_compare.py`` reads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.state import BASELINE_PREFIX, RunState
from pipeline.trials import VARIANT, with_overrides
from rarn.checkpoint import atomic_path, atomic_write
from rarn.config import Config
from rarn.config.variants import RANDOM_PREFIX, random_seed_of
from rarn.models.baselines import BASELINES
from rarn.space.genotype import Genotype
from rarn.study import (
    csv_row,
    data_digests,
    plot_study,
    run_row,
    runs_table,
    summarise,
    to_markdown,
    write_runs_csv,
)

__all__ = ["csv_rows", "study_rows", "write_study"]

log = logging.getLogger(__name__)

_CONSTRAINT_ONLY = ("frac_satisfied", "y")
FILES = ("runs.parquet", "runs.csv", "summary.parquet", "summary.md", "study.png")


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


def _genotype_json(state: RunState, run_dir: Path, key: str) -> str:
    """The genotype a model was retrained from, as JSON; a named network as ``{"network": ...}``."""
    trial = state.search.outcome(key) if state.search is not None else None
    if trial is not None and trial.genotype is not None:
        return trial.genotype.to_json()
    path = Path(run_dir) / "retrain" / key / "genotype.json"
    if path.is_file():
        return Genotype.from_json(path.read_text()).to_json()
    return json.dumps({"network": key.removeprefix(BASELINE_PREFIX)})


def _worst_case_mask(run_dir: Path, key: str) -> np.ndarray | None:
    """The per-image worst case over the attacks that ran on every test image, from the
    evaluation's records (None when they are missing)."""
    from rarn.robust.evaluation import worst_case_from_records

    path = Path(run_dir) / "evaluation" / key / "records.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(path)
    n = max(table.column("image").to_pylist(), default=-1) + 1
    full = sorted(
        {r["attack"] for r in table.select(["attack", "subset_n"]).to_pylist()
         if r["attack"] != "clean" and r["subset_n"] >= n}
    )  # fmt: skip
    try:
        return worst_case_from_records(table, attacks=full)[key].numpy()
    except (KeyError, ValueError) as e:
        log.warning("study: no per-image worst case for %s (%s)", key, e)
        return None


def csv_rows(
    cfg: Config, state: RunState, run_dir: Path, bundle: Any = None
) -> list[dict[str, Any]]:
    """:func:`study_rows` with what the CSV adds (:func:`rarn.study.csv_row`): the genotype
    JSON, every attack's accuracy, the digests (the stages' images from ``bundle``; the
    evaluated images as the evaluation recorded them) and the per-image worst case."""
    digests = data_digests(bundle) if bundle is not None else {}
    out = []
    for row in study_rows(cfg, state, run_dir):
        key = row["key"]
        ev = state.evaluate.get(key)
        d = dict(digests)
        if ev is not None:
            d |= {"eval_data_sha256": ev.data_sha256, "eval_protocol": ev.protocol}
        out.append(
            csv_row(
                row,
                genotype_json=_genotype_json(state, run_dir, key),
                evaluation=state.eval_metrics(key),
                digests=d,
                mask=_worst_case_mask(run_dir, key),
            )
        )
    return out


def write_study(
    cfg: Config, state: RunState, run_dir: Path, tracking: Any, bundle: Any = None
) -> str:
    """Write the study's files and log them to the parent run; returns the Markdown table.

    ``bundle`` (the run's :class:`rarn.data.DatasetBundle`) gives the CSV the digests of the
    search's and the retraining's images; without it those cells stay empty."""
    runs = runs_table(study_rows(cfg, state, run_dir))
    order = [*cfg.study.variants, "random"]
    summary = summarise(runs, order)
    out = Path(run_dir) / "study"
    out.mkdir(parents=True, exist_ok=True)
    for table, name in ((runs, "runs.parquet"), (summary, "summary.parquet")):
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    write_runs_csv(csv_rows(cfg, state, run_dir, bundle), out / "runs.csv")
    text = to_markdown(summary)
    atomic_write(out / "summary.md", text + "\n")
    plot_study(summary, out / "study.png")
    client = tracking.client()
    for name in FILES:
        client.log_artifact(tracking.parent_run_id, str(out / name), "study")
    return text
