"""A study's tables: one row per retrained genotype, then mean and spread per variant.

Study mode (``study:`` in the config, :mod:`rarn.config.variants`) runs search variants x seeds and
retrains every genotype alike; this module turns what each stage recorded into

* the per-run table (:data:`RUN_SCHEMA`): variant, seed, the search's final faithful
  ``ln lambda_F``, constraint activity, collapse signals, the genotype's op histogram, the
  supernet's robust accuracy, and the retrained model's clean / PGD / worst-case accuracy;
* the per-variant summary (:func:`summarise`): for every numeric column its mean, standard
  deviation (``ddof=1``; 0 for one seed) and the number of runs behind it;
* a Markdown table (:func:`to_markdown`) and a plot (:func:`plot_study`);
* the auditable per-network CSV (:func:`write_runs_csv`, :func:`read_runs_csv`): the per-run
  columns plus the genotype as JSON, every attack's accuracy, the number of test images, the
  digests of the data each stage used, and the per-image worst case as a hex bit mask, so that
  :mod:`rarn.stats` can compare variants from the committed file alone.

A difference between two variants means something only where it exceeds their spread: the
Markdown table prints ``mean ± std`` for that reason. Pure pyarrow; no Ray, no MLflow.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rarn.space.genotype import Genotype
from rarn.space.ops import PRIMITIVES

__all__ = [
    "CSV_DIGESTS",
    "METRICS",
    "RUN_SCHEMA",
    "csv_row",
    "data_digests",
    "mask_from_hex",
    "mask_to_hex",
    "op_histogram",
    "plot_study",
    "read_runs_csv",
    "run_row",
    "runs_table",
    "summarise",
    "to_markdown",
    "write_runs_csv",
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


# -- the auditable CSV ------------------------------------------------------------------------

CSV_DIGESTS = {
    "data_sha256": "sha256 of the data file (DatasetBundle.fingerprint)",
    "search_data_sha256": "data_sha256 (rarn.robust.evaluation.data_sha256) of the search's images",
    "retrain_data_sha256": "data_sha256 of the retraining's images",
    "test_data_sha256": "data_sha256 of the run's test images (what the evaluation must match)",
    "eval_data_sha256": "data_sha256 of the evaluated test images, as the evaluation recorded it",
    "eval_protocol": "sha256 of the evaluation settings (pipeline.evaluate.protocol_sha256)",
}
_CSV_HEAD = ("variant", "seed", "key", "genotype_sha", "genotype", "n", "clean_acc")
_CSV_WORST = ("worst_case_acc", "worst_case_n", "worst_case_full_acc", "worst_case_full_n")
_CSV_TEXT = {"variant", "key", "genotype_sha", "genotype", "worst_case_mask", *CSV_DIGESTS}
_NOT_ATTACKS = {"clean", "worst_case", "worst_case_full"}


def mask_to_hex(mask: np.ndarray) -> str:
    """A bool mask as ``<n>:<hex of its bits, packed big-endian>`` (one CSV cell)."""
    m = np.asarray(mask, dtype=bool)
    return f"{len(m)}:{np.packbits(m).tobytes().hex()}"


def mask_from_hex(text: str) -> np.ndarray:
    """The inverse of :func:`mask_to_hex` (an empty cell: an empty mask)."""
    if not text:
        return np.zeros(0, dtype=bool)
    n, _, bits = text.partition(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), dtype=np.uint8))[: int(n)].astype(bool)


def data_digests(bundle: Any, batch_size: int = 1024) -> dict[str, str]:
    """``data_sha256`` (:class:`rarn.robust.evaluation.DataHasher`) of the search's, the
    retraining's and the evaluation's images of a :class:`rarn.data.DatasetBundle`, batch by
    batch in dataset order; the test digest equals the evaluation records' ``data_sha256``."""
    from rarn.data import make_loader
    from rarn.robust.evaluation.records import DataHasher

    def digest(dataset: Any) -> str:
        h = DataHasher()
        for x, y in make_loader(dataset, batch_size, shuffle=False):
            h.update(x, y)
        return h.hexdigest()

    search = digest(bundle.train)
    retrain = search if getattr(bundle, "retrain", None) is None else digest(bundle.retrain)
    return {"data_sha256": bundle.fingerprint, "search_data_sha256": search,
            "retrain_data_sha256": retrain, "test_data_sha256": digest(bundle.test)}  # fmt: skip


def csv_row(
    row: Mapping[str, Any],
    *,
    genotype_json: str,
    evaluation: Mapping[str, float],
    digests: Mapping[str, str],
    mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """One CSV row: a :func:`run_row` plus the genotype as JSON, every ``eval_<attack>_acc`` as
    ``<attack>_acc``, the number of test images ``n``, the worst cases with their image counts,
    the digests (:data:`CSV_DIGESTS`) and the per-image worst case on all images (``mask``:
    bool, in evaluation order; None: not at hand)."""
    ev = dict(evaluation)
    out = dict(row) | {"genotype": genotype_json, "n": ev.get("eval_n", math.nan)}
    for k, v in ev.items():
        name = k.removeprefix("eval_").removesuffix("_acc")
        if k.startswith("eval_") and k.endswith("_acc") and name not in _NOT_ATTACKS:
            out.pop(f"{name}_acc", None)  # in the evaluation's order (pgd_acc is a run column)
            out[f"{name}_acc"] = float(v)
    for k in _CSV_WORST:
        out[k] = float(ev.get(f"eval_{k}", out.get(k, math.nan)))
    if math.isnan(out["worst_case_full_acc"]) and out["worst_case_n"] == out["n"]:
        # every attack ran on every image: the headline is the worst case on all of them
        out["worst_case_full_acc"], out["worst_case_full_n"] = out["worst_case_acc"], out["n"]
    out |= {k: str(digests.get(k, "")) for k in CSV_DIGESTS}
    out["worst_case_mask"] = "" if mask is None else mask_to_hex(mask)
    return out


def write_runs_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write :func:`csv_row` rows (sorted by variant, seed, key) as CSV, atomically.

    Columns: ``variant, seed, key, genotype_sha, genotype, n, clean_acc``, the attacks'
    ``<attack>_acc`` (in order of first appearance), the worst cases and their counts, the other
    per-run columns (:data:`RUN_SCHEMA`), the digests, ``worst_case_mask``. Empty cell: not
    measured.
    """
    from rarn.checkpoint import atomic_path

    rows = sorted(rows, key=lambda r: (r["variant"], r["seed"], r["key"]))
    fixed = {*_CSV_HEAD, *_CSV_WORST, *CSV_DIGESTS, "worst_case_mask"}
    attacks: list[str] = []
    for r in rows:  # the evaluation's accuracies, not the search's (supernet_*_acc)
        attacks += [
            k for k in r
            if k.endswith("_acc") and k not in fixed and k not in attacks
            and not METRICS.get(k, "eval").startswith("search")
        ]  # fmt: skip
    rest = [f.name for f in RUN_SCHEMA if f.name not in fixed and f.name not in attacks]
    columns = [*_CSV_HEAD, *attacks, *_CSV_WORST, *rest, *CSV_DIGESTS, "worst_case_mask"]

    def cell(v: Any) -> Any:
        if isinstance(v, float):
            return "" if math.isnan(v) else repr(v)
        return "" if v is None else v

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: cell(r.get(c)) for c in columns})
    return Path(path)


def read_runs_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of :func:`write_runs_csv`: numbers as float (``seed`` as int, an empty cell as
    NaN), text as str, ``worst_case_mask`` as a bool array."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if k == "seed":
                    row[k] = int(v)
                elif k == "worst_case_mask":
                    row[k] = mask_from_hex(v)
                elif k in _CSV_TEXT:
                    row[k] = v
                else:
                    row[k] = float(v) if v != "" else math.nan
            out.append(row)
    return out
