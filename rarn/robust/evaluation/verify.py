"""Verify a ledger: rerun chosen rows of the per-image records and compare them exactly.

Every row of :data:`~rarn.robust.evaluation.RECORDS_SCHEMA` names the weights
(``weights_sha256``), the data (``data_sha256``), the attack and every setting it ran with
(``method``, ``settings``), its own seed and its batch. An attack's batch ``b`` drew from
``batch_generator(seed, b)`` and attacked, in image order, exactly the images whose rows of that
attack have batch ``b`` and a non-null ``robust``; :func:`verify_records` reruns that batch alone
and compares the predicted label after the attack (``pred``) and ``robust`` of every chosen row,
on what the row's attack ran on (``model_form``: the model, or its folded copy).
Reruns are exact on the device kind the evaluation ran on (CPU here; GPU kernels may differ from
CPU ones). Rows of transfer attacks need their source model (``sources``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from rarn.robust.attacks import get_attack
from rarn.robust.evaluation._core import MODEL_FORMS, _predict, batch_generator, model_in_form
from rarn.robust.evaluation.records import data_sha256, weights_sha256

__all__ = ["RowCheck", "choose_rows", "verify_records"]


@dataclass(frozen=True)
class RowCheck:
    """One rerun row: what the ledger says and what the rerun gave."""

    row: int
    image: int
    attack: str
    recorded_pred: int | None
    pred: int | None
    recorded_robust: bool | None
    robust: bool | None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.pred == self.recorded_pred and self.robust == self.recorded_robust

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (
            f"row {self.row} image {self.image} {self.attack}: recorded pred "
            f"{self.recorded_pred} robust {self.recorded_robust}, rerun pred {self.pred} "
            f"robust {self.robust}: {verdict}{' (' + self.note + ')' if self.note else ''}"
        )


def choose_rows(table: pa.Table, k: int = 10, *, seed: int = 0) -> list[int]:
    """``k`` rows drawn at random among those of an attack that ran (non-null ``robust``)."""
    ran = pc.and_(
        pc.is_valid(table.column("robust")), pc.not_equal(table.column("attack"), "clean")
    )
    candidates = np.flatnonzero(ran.to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(candidates, size=min(k, candidates.size), replace=False).tolist())


def verify_records(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    table: pa.Table,
    rows: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    sources: Mapping[str, nn.Module] | None = None,
) -> list[RowCheck]:
    """Rerun the rows ``rows`` (indices into ``table``) of ``model`` on ``(x, y)``.

    Args:
        model: the evaluated model; its :func:`weights_sha256` must match the rows'.
        x: the evaluated inputs, in evaluation order (their :func:`data_sha256` with ``y`` must
            match the rows').
        y: their labels.
        table: a :data:`RECORDS_SCHEMA` table.
        rows: indices of the rows to rerun (e.g. :func:`choose_rows`).
        device: where to rerun (the device kind of the evaluation, for exact results).
        sources: transfer attacks: source model name -> model.

    Returns:
        One :class:`RowCheck` per row; ``all(c.ok for c in checks)`` is the verdict.

    Raises:
        ValueError: the weights or the data are not those of the rows.
    """
    device = torch.device(device)
    model = model.to(device)
    want_w, want_d = weights_sha256(model), data_sha256(x, y)
    sub = table.take(pa.array(list(rows), type=pa.int64()))
    for w, d in zip(
        sub.column("weights_sha256").to_pylist(), sub.column("data_sha256").to_pylist()
    ):
        if w != want_w:
            raise ValueError(f"weights sha256 {want_w[:12]}... are not the rows' ({w[:12]}...)")
        if d != want_d:
            raise ValueError(f"data sha256 {want_d[:12]}... is not the rows' ({d[:12]}...)")
    reruns: dict[tuple[str, str, int], dict[int, int]] = {}
    forms: dict[str, nn.Module] = {}  # model_form -> what the attacks ran on
    out = []
    for i, r in zip(rows, sub.to_pylist()):
        image, attack = r["image"], r["attack"]
        form = r.get("model_form") or MODEL_FORMS[False]  # ledgers before the column: as given
        if form not in forms:
            forms[form] = model_in_form(model, form, device)
        net = forms[form]
        if attack == "clean":
            pred = int(_predict(net, x[image : image + 1].to(device))[0])
            out.append(_check(i, r, pred, pred == r["label"]))
            continue
        if r["robust"] is None:
            out.append(_check(i, r, None, None, "not attacked: nothing to rerun"))
            continue
        key = (r["model"], attack, r["batch"])
        if key not in reruns:
            reruns[key] = _rerun_batch(net, x, y, table, r, device, sources or {})
        pred = reruns[key].get(image)
        out.append(_check(i, r, pred, None if pred is None else pred == r["label"]))
    return out


def _check(i: int, r: dict, pred: int | None, robust: bool | None, note: str = "") -> RowCheck:
    return RowCheck(i, r["image"], r["attack"], r["pred"], pred, r["robust"], robust, note)


def _rerun_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    table: pa.Table,
    r: dict,
    device: torch.device,
    sources: Mapping[str, nn.Module],
) -> dict[int, int]:
    """Image -> predicted label after rerunning the attack of row ``r`` on its whole batch."""
    t = table.filter(
        pc.and_(
            pc.and_(
                pc.equal(table.column("model"), r["model"]),
                pc.equal(table.column("attack"), r["attack"]),
            ),
            pc.and_(
                pc.equal(table.column("batch"), r["batch"]), pc.is_valid(table.column("robust"))
            ),
        )
    )
    images = np.sort(t.column("image").to_numpy())
    idx = torch.from_numpy(images)
    xb, yb = x[idx].to(device), y[idx].to(device)
    settings = json.loads(r["settings"])
    crafter = model
    if r["source"] == "transfer":
        src = settings.pop("source_model", None)
        if src not in sources:
            return {}
        crafter = sources[src].to(device)
    g = batch_generator(r["seed"], r["batch"], device)
    x_adv = get_attack(r["method"])(crafter, xb, yb, generator=g, **settings)
    pred = _predict(model, x_adv)
    return dict(zip(images.tolist(), pred.cpu().tolist()))
