"""Results tables: the record of one evaluated model, its fixed-schema table, Parquet.

Results are pyarrow tables with a fixed, documented schema (:data:`RESULTS_SCHEMA`: one row per
model x attack x eps; :data:`TRANSFER_SCHEMA`: one row per source x target model pair), so that
runs, MLflow artefacts and plots agree on what a column means. :func:`write_results` validates a
table before it writes anything. The per-image evidence behind these accuracies is a second table
(:mod:`rarn.robust.evaluation.records`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from rarn.checkpoint import atomic_path
from rarn.robust.attacks import ATTACK_NORM, attack_spec
from rarn.robust.evaluation.masking import MASKING_FLAGS
from rarn.robust.evaluation.stats import Interval, wilson_interval

__all__ = [
    "RESULTS_SCHEMA",
    "TRANSFER_SCHEMA",
    "RobustnessResult",
    "results_table",
    "write_results",
]


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


_COMMON = [
    _f("attack", pa.string(), "the attack's name in the suite, 'clean' or 'worst_case'"),
    _f("method", pa.string(), "registry key (rarn.robust.attacks.ATTACKS), 'clean', 'worst_case'"),
    _f("norm", pa.string(), "threat model of eps: 'linf', 'l2', 'none' (clean) or 'mixed'"),
    _f("eps", pa.float64(), "radius of the threat model (0 for clean)"),
    _f("step_size", pa.float64(), "attack step size (0 for clean and worst_case)"),
    _f("steps", pa.int64(), "attack iterations actually run (FGSM 1, AutoAttack n_iter)"),
    _f("accuracy", pa.float64(), "fraction of the n points classified correctly"),
    _f("n", pa.int64(), "number of evaluated points (an attack's subset: the first n)"),
    _f("ci_low", pa.float64(), "95 % Wilson interval of the accuracy over n: lower end"),
    _f("ci_high", pa.float64(), "95 % Wilson interval of the accuracy over n: upper end"),
    _f("implementation", pa.string(), "who implements the attack: 'rarn' or 'torchattacks'"),
    _f("impl_version", pa.string(), "version of that implementation"),
    _f("seed", pa.uint64(), "initial seed of the attack generator", nullable=True),
]
RESULTS_SCHEMA = pa.schema(
    [
        _f("model", pa.string(), "model label"),
        *_COMMON,
        _f("suite", pa.string(), "attacks of the worst case, '+'-joined, in order"),
        _f("coverage", pa.string(), "attacks that saw only some images: '<attack> on k of n'"),
        _f(
            "survivors",
            pa.bool_(),
            "the attack ran only on the images no earlier attack fooled: its accuracy is robust"
            " to it and to every earlier one; null: clean, worst_case",
            True,
        ),
        _f(
            "outcome",
            pa.string(),
            "adaptive attacks on the raised flags: 'confirmed' (any"
            " flag) or 'refuted'; null: no flag raised or none answered",
            True,
        ),
        *(
            _f(f"flag_{k}", pa.bool_(), f"masking check {k}; null: not run", True)
            for k in MASKING_FLAGS
        ),
        _f("masking_suspected", pa.bool_(), "any flag raised; null: no check run", True),
    ],
    metadata={"rarn.schema": "robustness-results/5"},
)
"""One row per model x attack x eps (clean, each attack alone, worst case, curve points).

An attack run on a subset (``n`` in its suite entry: the first n images; the masking checks'
attacks: the first ``check_n``) has that ``n`` and its accuracy over those images; the worst case
is over all images, each robust when no attack that ran on it fooled it, and ``coverage`` says
which attacks saw only some of them ("autoattack on 100 of 359"). An attack with ``survivors``
(AutoAttack's entries by default) ran only on the images of its subset that no earlier attack
fooled, so its ``accuracy`` is "robust to it and to every earlier attack" over its ``n``; every
image of its subset is still decided, by an earlier attack or by it. ``ci_low``/``ci_high``: the
95 % Wilson interval of ``accuracy`` over ``n``.
"""

TRANSFER_SCHEMA = pa.schema(
    [
        _f("source", pa.string(), "model the adversarial examples were crafted on"),
        _f("target", pa.string(), "model evaluated on them (source == target: white-box)"),
        *_COMMON,
    ],
    metadata={"rarn.schema": "transfer-matrix/3"},
)
"""One row per source x target model pair."""


@dataclass(frozen=True, eq=False)
class RobustnessResult:
    """Outcome of :func:`rarn.robust.evaluation.evaluate_robustness` for one model.

    Attributes:
        model_name: label used in tables.
        n: number of evaluated points.
        clean_accuracy: accuracy on clean inputs.
        robust_accuracy: name -> robust accuracy of that attack alone (empty if not computed),
            over its subset.
        worst_case_accuracy: ``robust.float().mean()``, over all ``n`` images.
        robust: (n,) bool on CPU, True where the image is classified correctly and every attack
            that ran on it failed.
        attacks: the names of every attack in the worst case, in order: the suite, then the
            masking checks' attacks at the suite's eps (``check.*``), then adaptive attacks
            (``adaptive.*``), then any added later (``transfer.*``, :func:`add_attack`).
        params: name -> effective ``eps``, ``step_size``, ``steps`` (and extra kwargs).
        main_attack: name of the attack of the accuracy-vs-eps curve.
        curve: eps -> robust accuracy of ``main_attack``.
        flags: :data:`MASKING_FLAGS` -> bool, None where a check was not run.
        seed: initial seed of the generator.
        correct: (n,) bool on CPU, True where the clean input is classified correctly.
        attacked: attack -> (n,) bool on CPU, True where the attack ran on the image.
        survived: attack -> (n,) bool on CPU, True where it ran and the image stayed correct.
        per_attack: each attack ran on every clean-correct image (else only on the survivors
            of the earlier ones).
        survivors: the suite's attacks that ran only on the images no earlier attack fooled
            (an entry's ``survivors``; all of them without ``per_attack``): their accuracy is
            robust to them and to every earlier attack.
        data_sha256: sha256 of the evaluated inputs and labels
            (:func:`rarn.robust.evaluation.data_sha256`).
        methods: name -> registry key of the attack (missing: the name is the key).
        subsets: name -> how many images it ran on, the first ones (missing: all ``n``).
        preds: name -> (n,) int64, the predicted label after the attack (-1: not run).
        batches: name -> (n,) int64, the batch the attack ran the image in (-1: not run).
        clean_pred: (n,) int64, the predicted label of the clean image.
        labels: (n,) int64, the true labels.
        seeds: name -> the attack's own seed (``attack_seed(seed, name)``).
        batch_sizes: name -> its batch size (its batch ``b`` is rerun alone by ``verify_records``).
        sources: name -> "suite", "check", "adaptive" or "transfer".
        outcomes: raised flag -> "confirmed" / "refuted" by the adaptive attacks.
        weights_sha256: :func:`~rarn.robust.evaluation.weights_sha256` of the evaluated model.
        components: name -> per image, the AutoAttack component that broke it (None: not
            broken, or not recorded); only for the reference AutoAttack.
        model_form: what the attacks ran on: ``"as_given"`` (the model) or ``"bn_folded"``
            (:func:`~rarn.models.inference.folded_copy`, ``fold_batchnorm``).

    ``correct``, ``attacked`` and ``survived`` are the per-image records
    (:func:`rarn.robust.evaluation.records_table`); ``robust`` is ``correct`` AND every
    ``survived``.
    """

    model_name: str
    n: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    worst_case_accuracy: float
    robust: Tensor
    attacks: tuple[str, ...]
    params: dict[str, dict[str, Any]]
    main_attack: str
    curve: dict[float, float] = field(default_factory=dict)
    flags: dict[str, bool | None] = field(default_factory=dict)
    seed: int | None = None
    correct: Tensor | None = None
    attacked: dict[str, Tensor] = field(default_factory=dict)
    survived: dict[str, Tensor] = field(default_factory=dict)
    per_attack: bool = True
    survivors: tuple[str, ...] = ()
    data_sha256: str | None = None
    methods: dict[str, str] = field(default_factory=dict)
    subsets: dict[str, int] = field(default_factory=dict)
    preds: dict[str, Tensor] = field(default_factory=dict)
    batches: dict[str, Tensor] = field(default_factory=dict)
    clean_pred: Tensor | None = None
    labels: Tensor | None = None
    seeds: dict[str, int] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    weights_sha256: str | None = None
    components: dict[str, list[str | None]] = field(default_factory=dict)
    model_form: str = "as_given"

    def method(self, name: str) -> str:
        """The registry key of the attack called ``name`` in the suite."""
        return self.methods.get(name, name)

    def subset(self, name: str) -> int:
        """How many images (the first ones) the attack called ``name`` ran on."""
        return self.subsets.get(name, self.n)

    @property
    def worst_case_n(self) -> int:
        """Images of the worst case: all ``n``."""
        return int(self.robust.numel())

    def coverage(self) -> dict[str, int]:
        """Attack -> how many images it saw, for the attacks that saw fewer than all ``n``."""
        return {a: self.subset(a) for a in self.attacks if self.subset(a) < self.n}

    def coverage_text(self) -> str:
        """E.g. ``"autoattack on 100 of 359; check.square200 on 128 of 359"`` ("" if none)."""
        return "; ".join(f"{a} on {k} of {self.n}" for a, k in self.coverage().items())

    def outcome(self) -> str | None:
        """ "confirmed" if an adaptive attack confirmed any raised flag, "refuted" if all were
        refuted, None if no flag was answered."""
        if not self.outcomes:
            return None
        return "confirmed" if "confirmed" in self.outcomes.values() else "refuted"

    def interval(self, name: str = "worst_case") -> Interval:
        """The 95 % Wilson interval of an accuracy: "worst_case", "clean" or an attack's name."""
        if name == "worst_case":
            k, n = int(self.robust.sum()), self.n
        elif name == "clean":
            k, n = round(self.clean_accuracy * self.n), self.n
        else:
            n = self.subset(name)
            k = round(self.robust_accuracy[name] * n)
        return Interval(k, n, *wilson_interval(k, n))

    def to_table(self) -> pa.Table:
        """Rows: clean, each attack alone, worst case, and the curve (schema RESULTS_SCHEMA)."""
        return results_table([self])


def _attack_row(name: str, p: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """The columns of one attack's row: ``name`` in the suite, ``method`` its registry key."""
    spec = attack_spec(method or name)
    return {
        "attack": name,
        "method": spec.name,
        "norm": spec.norm,
        "eps": float(p["eps"]),
        "step_size": float(p["step_size"]),
        "steps": spec.effective_steps(p),
        "implementation": spec.implementation,
        "impl_version": spec.version,
    }


def results_table(results: Iterable[RobustnessResult]) -> pa.Table:
    """Stack results into one table with schema :data:`RESULTS_SCHEMA`.

    Args:
        results: evaluated models.

    Returns:
        The table (clean row, one row per attack alone, the worst case, the curve points).
    """
    rows = []
    rarn = attack_spec("pgd")  # clean and worst-case rows are credited to rarn
    for r in results:
        norms = {ATTACK_NORM[r.method(a)] for a in r.attacks}
        same = {r.params[a]["eps"] for a in r.attacks}
        base = {
            "model": r.model_name,
            "n": r.n,
            "seed": r.seed,
            "suite": "+".join(r.attacks),
            "coverage": "",
            "outcome": r.outcome(),
            **{f"flag_{k}": r.flags.get(k) for k in MASKING_FLAGS},
            "masking_suspected": any(bool(r.flags.get(k)) for k in MASKING_FLAGS)
            if any(r.flags.get(k) is not None for k in MASKING_FLAGS)
            else None,
        }
        clean = {"attack": "clean", "method": "clean", "norm": "none", "eps": 0.0}
        rows.append({**base, **clean, "step_size": 0.0, "steps": 0, "accuracy": r.clean_accuracy})
        for a, acc in r.robust_accuracy.items():
            row = _attack_row(a, r.params[a], r.method(a))
            row["survivors"] = a in r.survivors
            rows.append({**base, **row, "n": r.subset(a), "accuracy": acc})
        worst = {
            "attack": "worst_case",
            "method": "worst_case",
            "norm": norms.pop() if len(norms) == 1 else "mixed",
            "eps": same.pop() if len(same) == 1 else math.nan,
            "step_size": 0.0,
            "steps": 0,
            "n": r.worst_case_n,
            "coverage": r.coverage_text(),
        }
        rows.append({**base, **worst, "accuracy": r.worst_case_accuracy})
        main, alone = r.params[r.main_attack], r.subset(r.main_attack) == r.n
        alone = alone and r.main_attack not in r.survivors
        for e, acc in r.curve.items():
            if r.main_attack in r.robust_accuracy and alone and math.isclose(e, main["eps"]):
                continue  # already a row
            p = {**main, "eps": e, "step_size": main["step_size"] * e / main["eps"]}
            row = _attack_row(r.main_attack, p, r.method(r.main_attack))
            rows.append({**base, **row, "accuracy": acc})
    _with_intervals(rows)
    for row in rows:
        row.setdefault("implementation", rarn.implementation)
        row.setdefault("impl_version", rarn.version)
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def _with_intervals(rows: list[dict[str, Any]]) -> None:
    """Fill ``ci_low``/``ci_high``: the 95 % Wilson interval of ``accuracy`` over ``n``."""
    for row in rows:
        n = int(row["n"])
        row["ci_low"], row["ci_high"] = wilson_interval(round(row["accuracy"] * n), n)


def _checked(table: pa.Table) -> pa.Table:
    for schema in (RESULTS_SCHEMA, TRANSFER_SCHEMA):
        if table.schema.equals(schema, check_metadata=False):
            break
    else:
        raise ValueError(
            "table schema is neither RESULTS_SCHEMA nor TRANSFER_SCHEMA:\n" + str(table.schema)
        )
    if table.num_rows == 0:
        raise ValueError("refusing to write an empty results table")
    acc = table.column("accuracy").to_pylist()
    if any(not (0.0 <= a <= 1.0) for a in acc):
        raise ValueError(f"accuracies must lie in [0, 1], got {acc}")
    return table.cast(schema)


def write_results(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Validate ``table`` against its schema and write it as Parquet, atomically.

    Args:
        table: a table with :data:`RESULTS_SCHEMA` or :data:`TRANSFER_SCHEMA`.
        path: destination ``.parquet`` file (parent folders are created).

    Returns:
        The written path.

    Raises:
        ValueError: wrong schema, no rows or accuracies outside [0, 1]; nothing is written.
    """
    table, path = _checked(table), Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
