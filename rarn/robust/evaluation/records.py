"""Per-image records: one row per image x attack, so that worst cases can be recombined later.

The summary table (:data:`~rarn.robust.evaluation.results.RESULTS_SCHEMA`) keeps accuracies;
this one keeps the evidence they come from: for every evaluated image and every attack, whether
the image was still classified correctly, every setting the attack ran with, and a sha256 of the
evaluated inputs and labels (:func:`data_sha256`). Adding an attack later is one evaluation of
that attack on the same data (same sha256): concatenate the tables and recombine with
:func:`worst_case_from_records`, without rerunning the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from rarn.checkpoint import atomic_path
from rarn.robust.attacks import attack_spec
from rarn.robust.evaluation.results import _f

if TYPE_CHECKING:
    from rarn.robust.evaluation.results import RobustnessResult

__all__ = [
    "RECORDS_SCHEMA",
    "DataHasher",
    "data_sha256",
    "records_table",
    "weights_sha256",
    "worst_case_from_records",
    "write_records",
]


RECORDS_SCHEMA = pa.schema(
    [
        _f("model", pa.string(), "model label"),
        _f("data_sha256", pa.string(), "sha256 of the evaluated inputs and labels (data_sha256)"),
        _f("weights_sha256", pa.string(), "sha256 of the evaluated weights (weights_sha256)"),
        _f("image", pa.int64(), "index of the image in evaluation order, 0 .. n-1"),
        _f("label", pa.int64(), "the image's true label"),
        _f("attack", pa.string(), "the attack's name in the worst case, or 'clean'"),
        _f("method", pa.string(), "registry key (rarn.robust.attacks.ATTACKS), or 'clean'"),
        _f("source", pa.string(), "'clean', 'suite', 'check', 'adaptive' or 'transfer'"),
        _f("robust", pa.bool_(), "classified correctly after the attack; null: not run", True),
        _f("clean_pred", pa.int64(), "predicted label of the clean image"),
        _f("pred", pa.int64(), "predicted label after the attack; null: not run", True),
        _f("batch", pa.int64(), "the attack's batch the image ran in; null: not run", True),
        _f("component", pa.string(), "AutoAttack's component that broke it; null: none", True),
        _f("batch_size", pa.int64(), "the attack's batch size (a batch is rerun whole)"),
        _f("subset_n", pa.int64(), "the attack's subset: it saw only images 0 .. subset_n-1"),
        _f("mode", pa.string(), "how this attack ran: 'per_attack' or 'survivors' (see the doc)"),
        _f("norm", pa.string(), "threat model of eps: 'linf', 'l2' or 'none' (clean)"),
        _f("eps", pa.float64(), "radius of the threat model (0 for clean)"),
        _f("step_size", pa.float64(), "step size as passed (ignored by fgsm, square, autoattack)"),
        _f("steps", pa.int64(), "attack iterations actually run (FGSM 1, AutoAttack n_iter)"),
        _f("random_start", pa.bool_(), "random start in the eps-ball; null: no such option", True),
        _f("decay", pa.float64(), "MIM momentum decay mu; null: not MIM", True),
        _f("kappa", pa.float64(), "CW margin confidence (inf: no clamp); null: not CW", True),
        _f("queries", pa.int64(), "queries of a black-box search (Square); null: none", True),
        _f("attack_version", pa.string(), "AutoAttack's version ('standard'); null: none", True),
        _f("implementation", pa.string(), "who implements the attack: 'rarn' or 'torchattacks'"),
        _f("impl_version", pa.string(), "version of that implementation"),
        _f("settings", pa.string(), "every keyword argument it ran with, defaults too, as JSON"),
        _f("model_form", pa.string(), "what the attack ran on: 'as_given' or 'bn_folded'"),
        _f("seed", pa.uint64(), "the attack's own seed (attack_seed(eval_seed, attack))", True),
        _f("eval_seed", pa.uint64(), "the evaluation's seed", nullable=True),
    ],
    metadata={"rarn.schema": "robustness-records/4"},
)
"""One row per model x image x attack (``clean`` included): the evidence of the worst case.

``robust`` is True where the image is still classified correctly after the attack (for
``clean``: classified correctly at all) and null where the attack did not run on it: the image
was misclassified clean, or, in ``mode`` 'survivors' (AutoAttack's way: the attack only on the
images no earlier attack fooled; the AutoAttack entries' default, every attack's without
``per_attack``), an earlier attack had already fooled it; in 'per_attack' mode the attack ran on
every clean-correct image of its subset; the clean rows' ``mode`` is the evaluation's.
``subset_n`` is the number of images the attack was limited to (``n`` of its suite entry: the
first ones; the number of images when it saw all), so an image ``>= subset_n`` with ``robust``
null was never shown to it. ``queries`` is Square's query budget (its ``steps``) or
AutoAttack's ``n_queries``; ``settings`` is JSON with sorted keys.

The ledger: ``weights_sha256`` names the weights, ``clean_pred`` and ``pred`` the labels before and
after the attack, ``seed`` the attack's own seed; batch ``batch`` of that attack (the rows of the
attack with that batch and a non-null ``robust``) drew from ``batch_generator(seed, batch)``, so
:func:`~rarn.robust.evaluation.verify_records` reruns it alone and compares every ``pred``.
"""


class DataHasher:
    """sha256 of inputs and labels, fed batch by batch (the same digest as one big batch).

    The digest covers the bytes of ``x`` (C-contiguous, in its dtype), the labels as int64, and a
    header with the dtype, the per-image shape and the number of images.
    """

    def __init__(self) -> None:
        self._x, self._y = hashlib.sha256(), hashlib.sha256()
        self._n, self._layout = 0, ""

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one batch (any device, any memory format)."""
        layout = f"{x.dtype} {tuple(x.shape[1:])}"
        if self._n and layout != self._layout:
            raise ValueError(f"batches disagree on dtype or shape: {layout} vs {self._layout}")
        self._layout, self._n = layout, self._n + x.shape[0]
        x_bytes = x.detach().cpu().contiguous().view(-1).view(torch.uint8)  # any dtype, bf16 too
        self._x.update(x_bytes.numpy().tobytes())
        self._y.update(y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        head = f"rarn-data/1 x {self._layout} n={self._n}\n".encode()
        return hashlib.sha256(head + self._x.digest() + self._y.digest()).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's ``state_dict``: every entry's name, dtype, shape and bytes, in order
    (independent of how the weights were serialised)."""
    h = hashlib.sha256(b"rarn-weights/1\n")
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_sha256(x: Tensor, y: Tensor) -> str:
    """The ``data_sha256`` of the records of an evaluation of ``(x, y)`` (see :class:`DataHasher`).

    Example:
        >>> data_sha256(x_test, y_test) == records.column("data_sha256")[0].as_py()
    """
    h = DataHasher()
    h.update(x, y)
    return h.hexdigest()


def _settings_columns(method: str, params: dict[str, Any]) -> dict[str, Any]:
    spec = attack_spec(method)
    s = spec.settings(params)
    queries = s.get("n_queries", None if spec.white_box else spec.effective_steps(s))
    return {
        "method": method,
        "norm": spec.norm,
        "eps": float(s["eps"]),
        "step_size": float(s["step_size"]),
        "steps": spec.effective_steps(s),
        "random_start": s.get("random_start"),
        "decay": s.get("decay"),
        "kappa": s.get("kappa"),
        "queries": queries,
        "attack_version": s.get("version"),
        "implementation": spec.implementation,
        "impl_version": spec.version,
        "settings": json.dumps(s, sort_keys=True, default=repr),
    }


_CLEAN = {"method": "clean", "norm": "none", "eps": 0.0, "step_size": 0.0, "steps": 0}


def _one_result(r: RobustnessResult) -> Iterable[pa.Table]:
    """One table per attack (clean first): n rows each, constant columns repeated."""
    if r.correct is None or r.data_sha256 is None or set(r.survived) != set(r.attacks):
        raise ValueError(f"result {r.model_name!r} carries no per-image records")
    rarn = attack_spec("pgd")  # the clean rows are credited to rarn
    n = r.n
    none = torch.full((n,), -1, dtype=torch.long)
    clean_pred = r.clean_pred if r.clean_pred is not None else none
    base = {
        "model": r.model_name,
        "data_sha256": r.data_sha256,
        "weights_sha256": r.weights_sha256 or "",
        "eval_seed": r.seed,
        "model_form": r.model_form,
        "implementation": rarn.implementation,
        "impl_version": rarn.version,
    }
    clean = {**_CLEAN, "settings": "{}", "source": "clean", "batch_size": 0, "seed": r.seed}
    clean["mode"] = "per_attack" if r.per_attack else "survivors"
    blocks = [("clean", r.correct, torch.ones_like(r.correct), clean_pred, none, clean)]
    for a in r.attacks:
        settings = _settings_columns(r.method(a), r.params[a])
        settings |= {
            "mode": "survivors" if a in r.survivors or not r.per_attack else "per_attack",
            "source": r.sources.get(a, "suite"),
            "batch_size": r.batch_sizes.get(a, 0),
            "seed": r.seeds.get(a, r.seed),
        }
        pred = r.preds.get(a, none)
        blocks.append((a, r.survived[a], r.attacked[a], pred, r.batches.get(a, none), settings))
    labels = r.labels if r.labels is not None else none
    for name, survived, attacked, pred, batch, settings in blocks:
        consts = {**base, **settings, "attack": name, "subset_n": r.subset(name)}
        ran = attacked.numpy()
        cols: dict[str, Any] = {
            "image": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array(labels.numpy().astype(np.int64)),
            "robust": pa.array(survived.numpy(), mask=~ran),
            "clean_pred": pa.array(clean_pred.numpy().astype(np.int64)),
            "pred": pa.array(pred.numpy().astype(np.int64), mask=~ran | (pred.numpy() < 0)),
            "batch": pa.array(batch.numpy().astype(np.int64), mask=~ran | (batch.numpy() < 0)),
        }
        comp = r.components.get(name)
        if comp is not None:
            cols["component"] = pa.array(comp, type=pa.string())
        if name == "clean":
            cols["pred"] = cols["clean_pred"]
        for f in RECORDS_SCHEMA:
            if f.name not in cols:
                cols[f.name] = pa.repeat(pa.scalar(consts.get(f.name), f.type), n)
        yield pa.table(cols).select(RECORDS_SCHEMA.names).cast(RECORDS_SCHEMA)


def records_table(results: Iterable[RobustnessResult]) -> pa.Table:
    """Stack the per-image records of ``results`` into one table with :data:`RECORDS_SCHEMA`.

    Raises:
        ValueError: a result without per-image records (not from ``evaluate_robustness``).
    """
    tables = [t for r in results for t in _one_result(r)]
    if not tables:
        return RECORDS_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def write_records(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Validate ``table`` against :data:`RECORDS_SCHEMA` and write it as Parquet, atomically.

    Raises:
        ValueError: wrong schema or no rows; nothing is written.
    """
    if not table.schema.equals(RECORDS_SCHEMA, check_metadata=False):
        raise ValueError("table schema is not RECORDS_SCHEMA:\n" + str(table.schema))
    if table.num_rows == 0:
        raise ValueError("refusing to write an empty records table")
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(RECORDS_SCHEMA), tmp)
    return path


def _worst_case_of(rows: pa.Table, model: str) -> Tensor:
    """Per image of one model: classified correctly and fooled by none of the attacks of
    ``rows`` that ran on it; an image inside an attack's subset that the attack skipped
    (survivors mode) and no chosen attack fooled is undetermined."""
    image = rows.column("image").to_numpy()
    robust = rows.column("robust")
    known = pc.is_valid(robust).to_numpy()
    value = pc.fill_null(robust, True).to_numpy()
    attack = rows.column("attack").to_numpy(zero_copy_only=False)
    clean = np.unique(image[attack == "clean"])
    n = clean.size
    if not np.array_equal(clean, np.arange(n)) or image.max(initial=-1) >= n:
        raise ValueError(f"model {model!r}: the clean rows must cover the images 0 .. n-1")
    is_clean = attack == "clean"
    correct = np.zeros(n, dtype=bool)
    correct[image[is_clean]] = value[is_clean] & known[is_clean]
    broken = ~correct
    np.logical_or.at(broken, image, known & ~value)
    inside = image < rows.column("subset_n").to_numpy()
    skipped = np.zeros(n, dtype=bool)
    np.logical_or.at(skipped, image, ~known & inside & ~is_clean)
    if (skipped & ~broken).any():
        raise ValueError(
            f"model {model!r}: images {np.flatnonzero(skipped & ~broken)[:5].tolist()}... were"
            " skipped by a chosen attack and none of them fooled it (an attack left out was the"
            " one that did, in 'survivors' mode): rerun with per_attack"
        )
    return torch.from_numpy(~broken)


def worst_case_from_records(
    table: pa.Table, *, attacks: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Recombine per-image records into the worst case: robust against every chosen attack.

    Rows of several evaluations of one model on the same data (same ``data_sha256``), e.g. the
    original suite and an attack added later, are combined image by image over all images: an
    image is robust when it is classified correctly and no chosen attack that ran on it fooled
    it (an attack on a subset says nothing about the other images, and adding an attack can
    only lower the result). The worst-case robust accuracy is ``mask.sum() / len(mask)``,
    exactly as stored in the results table.

    Args:
        table: a :data:`RECORDS_SCHEMA` table (or a concatenation of several).
        attacks: the attacks to combine (default: all in the table); ``clean`` always counts.

    Returns:
        Model -> (n,) bool on CPU over images 0 .. n-1, True where the image was classified
        correctly and no chosen attack fooled it.

    Raises:
        KeyError: a chosen attack has no rows for some model.
        ValueError: a model's rows come from different data, do not cover its images, or leave
            an image undetermined.
    """
    out: dict[str, Tensor] = {}
    for model in pc.unique(table.column("model")).to_pylist():
        rows = table.filter(pc.equal(table.column("model"), model))
        shas = pc.unique(rows.column("data_sha256")).to_pylist()
        if len(shas) != 1:
            raise ValueError(f"model {model!r}: rows from different data (sha256 {shas})")
        present = set(pc.unique(rows.column("attack")).to_pylist())
        wanted = {"clean", *(present if attacks is None else attacks)}
        if missing := wanted - present:
            raise KeyError(f"model {model!r}: no records of {sorted(missing)}")
        rows = rows.filter(pc.is_in(rows.column("attack"), pa.array(sorted(wanted))))
        out[model] = _worst_case_of(rows, model)
    return out
