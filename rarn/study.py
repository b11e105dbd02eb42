"""A study's tables: one row per retrained genotype, then mean and spread per variant.

Study mode (``study:`` in the config, :mod:`rarn.nas.variants`) runs search variants x seeds and
retrains every genotype alike; this module turns what each stage recorded into

* the per-run table (:data:`RUN_SCHEMA`): variant, seed, the search's final faithful
  ``ln lambda_F``, constraint activity, collapse signals, the genotype's op histogram, the
  supernet's robust accuracy, and the retrained model's clean / PGD / worst-case accuracy;
* the per-variant summary (:func:`summarise`): for every numeric column its mean, standard
  deviation (``ddof=1``; 0 for one seed) and the number of runs behind it;
* a Markdown table (:func:`to_markdown`) and a plot (:func:`plot_study`).

A difference between two variants means something only where it exceeds their spread: the
Markdown table prints ``mean ± std`` for that reason. Pure pyarrow; no Ray, no MLflow.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from rarn.nas.genotype import Genotype
from rarn.nas.ops import PRIMITIVES

__all__ = [
    "METRICS",
    "RUN_SCHEMA",
    "op_histogram",
    "plot_study",
    "run_row",
    "runs_table",
    "summarise",
    "to_markdown",
]

METRICS: dict[str, str] = {
    # column -> where it comes from (search: the trial's last report; eval: the evaluation)
    "log_lambda_faithful": "search: ln lambda_F, product bound over every op (all variants alike)",
    "constraint_active": "search: share of the last epoch's architecture steps with h > 0 "
    "(NaN: no constraint)",
    "dual": "search: the dual variable y at the end (NaN: no constraint)",
    "collapsed": "search: 1 if the collapse detector tripped on the final genotype",
    "param_free_normal": "search: normal cell's share of skip/pool edges",
    "supernet_pgd_acc": "search: supernet PGD accuracy on D_V (val_pgd_acc)",
    "supernet_val_acc": "search: supernet clean accuracy on D_V",
    "clean_acc": "eval: clean test accuracy of the retrained network",
    "pgd_acc": "eval: PGD accuracy",
    "worst_case_acc": "eval: per-image worst case over every attack that ran on an image "
    "(suite, AutoAttack on its subset, the checks' and adaptive attacks), over all test images",
    "worst_case_full_acc": "eval: worst case over the attacks that ran on every test image",
}
_OPS = [p for p in PRIMITIVES if p != "none"]
RUN_SCHEMA = pa.schema(
    [
        pa.field("variant", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("genotype_sha", pa.string()),
        *[pa.field(m, pa.float64()) for m in METRICS],
        *[pa.field(f"ops_{p}", pa.int64()) for p in _OPS],
    ]
)
"""One row per retrained genotype; NaN where a stage did not measure a value (e.g. the
constraint columns of an unconstrained variant, every search column of a random genotype)."""


def op_histogram(genotype: Genotype) -> dict[str, int]:
    """``ops_<op>``: how many edges of both cells use each op."""
    counts = Counter(op for cell in (genotype.normal, genotype.reduce) for op, _ in cell)
    return {f"ops_{p}": counts.get(p, 0) for p in _OPS}


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def run_row(
    *,
    variant: str,
    seed: int,
    key: str,
    genotype: Genotype | None,
    search: Mapping[str, float] | None,
    evaluation: Mapping[str, float] | None,
    genotype_sha: str | None = None,
) -> dict[str, Any]:
    """One :data:`RUN_SCHEMA` row from a trial's last search metrics (None: not searched) and
    the evaluation's headline metrics (``eval_*``; None: not evaluated).

    ``genotype`` None is a named network (e.g. ``resnet18``): no cell, so an empty op histogram
    (every ``ops_*`` 0) and NaN collapse signals; ``genotype_sha`` is then its architecture
    digest (:func:`rarn.models.baselines.baseline_sha256`), otherwise the genotype's sha256.
    """
    s, e = dict(search or {}), dict(evaluation or {})
    frac = s.get("frac_satisfied")
    if genotype_sha is None:
        genotype_sha = genotype.sha256() if genotype is not None else ""
    row = {
        "variant": variant,
        "seed": int(seed),
        "key": key,
        "genotype_sha": genotype_sha,
        "log_lambda_faithful": _nan(s.get("log_lambda_faithful")),
        "constraint_active": math.nan if frac is None else 1.0 - float(frac),
        "dual": _nan(s.get("y")),
        "collapsed": _nan(s.get("collapsed")),
        "param_free_normal": _nan(s.get("collapse_param_free_share_normal")),
        "supernet_pgd_acc": _nan(s.get("val_pgd_acc")),
        "supernet_val_acc": _nan(s.get("val_acc")),
        "clean_acc": _nan(e.get("eval_clean_acc")),
        "pgd_acc": _nan(e.get("eval_pgd_acc")),
        "worst_case_acc": _nan(e.get("eval_worst_case_acc")),
        "worst_case_full_acc": _nan(e.get("eval_worst_case_full_acc")),
    }
    if genotype is None:
        return row | {f"ops_{p}": 0 for p in _OPS}
    if search is None:  # not searched: its collapse signals come from the genotype alone
        from rarn.nas.collapse import detect_collapse

        report = detect_collapse(genotype)
        row["collapsed"] = float(report.collapsed)
        row["param_free_normal"] = report.param_free_share["normal"]
    return row | op_histogram(genotype)


def runs_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """The per-run table, sorted by variant then seed."""
    rows = sorted(rows, key=lambda r: (r["variant"], r["seed"], r["key"]))
    return pa.Table.from_pylist(rows, schema=RUN_SCHEMA)


def _numeric() -> list[str]:
    return [f.name for f in RUN_SCHEMA if f.name not in ("variant", "seed", "key", "genotype_sha")]


def summarise(runs: pa.Table, order: Sequence[str] = ()) -> pa.Table:
    """Per variant (in ``order``, then the rest alphabetically): ``n`` and, for every numeric
    column, ``<col>_mean`` and ``<col>_std`` over the runs where it was measured (NaN: never)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs.to_pylist():
        by.setdefault(r["variant"], []).append(r)
    names = [v for v in order if v in by] + sorted(v for v in by if v not in order)
    out = []
    for v in names:
        row: dict[str, Any] = {"variant": v, "n": len(by[v])}
        for col in _numeric():
            vals = [float(r[col]) for r in by[v] if r[col] is not None and not math.isnan(r[col])]
            row[f"{col}_mean"] = statistics.fmean(vals) if vals else math.nan
            row[f"{col}_std"] = (
                statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else math.nan
            )
        out.append(row)
    fields = [pa.field("variant", pa.string()), pa.field("n", pa.int64())]
    fields += [pa.field(f"{c}_{s}", pa.float64()) for c in _numeric() for s in ("mean", "std")]
    return pa.Table.from_pylist(out, schema=pa.schema(fields))


_SHOWN = (
    ("worst_case_acc", "worst case (AA subset)"),
    ("worst_case_full_acc", "worst case (all images, no AA)"),
    ("pgd_acc", "PGD"),
    ("clean_acc", "clean"),
    ("supernet_pgd_acc", "supernet PGD"),
    ("log_lambda_faithful", "ln λ_F"),
    ("constraint_active", "h > 0 share (last epoch)"),
    ("dual", "dual y"),
    ("collapsed", "collapsed"),
    ("param_free_normal", "param-free (normal)"),
)


def to_markdown(summary: pa.Table) -> str:
    """The summary as a Markdown table of ``mean ± std`` (n runs per variant)."""
    head = ["variant", "n", *[label for _, label in _SHOWN], "ops (both cells, summed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.to_pylist():
        cells = [r["variant"], str(r["n"])]
        for col, _ in _SHOWN:
            m, s = r[f"{col}_mean"], r[f"{col}_std"]
            digits = 1 if col == "log_lambda_faithful" else 3
            cells.append("–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}")
        ops = {p: r[f"ops_{p}_mean"] * r["n"] for p in _OPS}
        cells.append(", ".join(f"{p} {round(n)}" for p, n in ops.items() if round(n)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_study(summary: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Bars of the retrained clean, PGD and both worst-case accuracies per variant (mean, std as
    error bars), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rarn.robust.evaluation.plots import save_figure

    rows = summary.to_pylist()
    cols = (
        ("clean_acc", "clean"),
        ("pgd_acc", "PGD"),
        ("worst_case_full_acc", "worst case, all images (no AutoAttack)"),
        ("worst_case_acc", "worst case on AutoAttack's subset (headline)"),
    )
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 3.6))
    width = 0.8 / len(cols)
    for i, (col, label) in enumerate(cols):
        xs = [j + (i - (len(cols) - 1) / 2) * width for j in range(len(rows))]
        ys = [0.0 if math.isnan(r[f"{col}_mean"]) else r[f"{col}_mean"] for r in rows]
        err = [0.0 if math.isnan(r[f"{col}_std"]) else r[f"{col}_std"] for r in rows]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['variant']}\n(n={r['n']})" for r in rows], fontsize=8)
    ax.set_ylabel("test accuracy of the retrained network")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("study: mean ± std over seeds")
    return save_figure(fig, Path(path))
