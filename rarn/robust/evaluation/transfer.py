"""Black-box transfer: adversarial examples crafted on one model, evaluated on another.

A transfer matrix (source x target) shows how far adversarial examples carry between models. A
target that resists its own white-box attack but falls to examples crafted on another model
suggests masked gradients (Athalye et al. 2018, https://arxiv.org/abs/1802.00420).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn

from rarn.models.common import device_of
from rarn.robust.attacks import get_attack
from rarn.robust.evaluation._core import (
    Data,
    _batches,
    _check_budget,
    _fraction,
    _predict,
    attack_seed,
    batch_generator,
    model_in_form,
)
from rarn.robust.evaluation.records import data_sha256
from rarn.robust.evaluation.results import (
    TRANSFER_SCHEMA,
    RobustnessResult,
    _attack_row,
    _with_intervals,
)

__all__ = ["add_transfer", "transfer_matrix"]


def transfer_matrix(
    models: Mapping[str, nn.Module],
    data: Data,
    *,
    attack: str = "pgd",
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 20,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    attack_kwargs: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Black-box transfer: craft on each source model, evaluate on every target model.

    Args:
        models: name -> classifier (logits); each is evaluated on its own device.
        data: a loader of ``(x, y, ...)`` batches or one ``(x, y)`` pair.
        attack: attack used on the sources.
        eps: threat-model radius.
        step_size: attack step size.
        steps: attack steps.
        generator: randomness (None: seeded with 0).
        batch_size: batch size when ``data`` is a pair of tensors.
        attack_kwargs: extra keyword arguments of the attack.

    Returns:
        Table with schema :data:`TRANSFER_SCHEMA`: target accuracy on all n points (the
        diagonal is white-box robust accuracy counting clean errors).

    Raises:
        KeyError: unknown attack. ValueError: no models, bad parameters, or no data.
    """
    fn = get_attack(attack)
    if not models:
        raise ValueError("models must hold at least one model")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    p = {"eps": eps, "step_size": step_size, "steps": steps, **(attack_kwargs or {})}
    _check_budget(p["eps"], p["step_size"], p["steps"])
    hits = {(s, t): 0 for s in models for t in models}
    n = 0
    for xb, yb in _batches(data, batch_size):
        n += xb.shape[0]
        for s, src in models.items():
            dev = device_of(src)
            x_adv = fn(src, xb.to(dev), yb.to(dev), generator=generator, **p)
            for t, tgt in models.items():
                dt = device_of(tgt)
                hits[s, t] += int((_predict(tgt, x_adv.to(dt)) == yb.to(dt)).sum())
    if n == 0:
        raise ValueError("no data: the loader yielded no points")
    base = {**_attack_row(attack, p), "n": n, "seed": generator.initial_seed()}
    rows = [{"source": s, "target": t, **base, "accuracy": h / n} for (s, t), h in hits.items()]
    _with_intervals(rows)
    return pa.Table.from_pylist(rows, schema=TRANSFER_SCHEMA)


def add_transfer(
    result: RobustnessResult,
    target: nn.Module,
    source: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    source_name: str,
    attack: str = "pgd",
    params: Mapping[str, Any] | None = None,
    n: int = 0,
    batch_size: int = 256,
) -> RobustnessResult:
    """``result`` with a transfer attack added to its worst case: ``attack`` crafted on
    ``source`` (e.g. an unmasked twin, or another model of the run), judged on ``target``.

    The attack runs on the clean-correct images among the first ``n`` (0: all) of the evaluated
    data ``(x, y)`` (its sha256 must be the result's), batch ``b`` drawing from
    ``batch_generator(attack_seed(result.seed, name), b)``; its name is
    ``transfer.<source_name>``, its source ``"transfer"``. The headline can only fall.

    Args:
        result: an evaluation of ``target`` on ``(x, y)`` (:func:`evaluate_robustness`).
        target: the evaluated model.
        source: the model the examples are crafted on.
        x: the evaluated inputs, in evaluation order.
        y: their labels.
        source_name: label of the source (letters, digits, ``_.-``).
        attack: registry key of the attack run on the source.
        params: its keyword arguments (default: the result's main attack's).
        n: only the first ``n`` images (0: all).
        batch_size: batch size of the crafting.

    Raises:
        ValueError: other data than the result's, or a name already in it.
    """
    if result.correct is None or data_sha256(x, y) != result.data_sha256:
        raise ValueError("add_transfer needs the result's own data (same data_sha256)")
    name = f"transfer.{source_name}"
    if name in result.attacks:
        raise ValueError(f"{name!r} is already in the worst case")
    p = dict(params if params is not None else result.params[result.main_attack])
    _check_budget(p["eps"], p["step_size"], p["steps"])
    m = result.n if n == 0 else min(n, result.n)
    seed = attack_seed(result.seed or 0, name)
    dev, gdev = device_of(target), device_of(source)
    judge = model_in_form(target, result.model_form, dev)  # as the result's own attacks did
    pred = torch.full((result.n,), -1, dtype=torch.long)
    batch = torch.full((result.n,), -1, dtype=torch.long)
    for b, i in enumerate(range(0, m, batch_size)):
        ok = result.correct[i : min(i + batch_size, m)]
        idx = torch.arange(i, i + len(ok))[ok]
        if idx.numel() == 0:
            continue
        g = batch_generator(seed, b, gdev)
        x_adv = get_attack(attack)(source, x[idx].to(gdev), y[idx].to(gdev), generator=g, **p)
        pred[idx], batch[idx] = _predict(judge, x_adv.to(dev)).cpu(), b
    labels = y.cpu().long()
    ran = pred >= 0
    survived = ran & (pred == labels)
    robust = result.robust & (survived | ~ran)
    add = lambda d, v: {**d, name: v}  # noqa: E731
    return dataclasses.replace(
        result,
        attacks=(*result.attacks, name),
        robust=robust,
        worst_case_accuracy=_fraction(robust),
        robust_accuracy=add(result.robust_accuracy, _fraction(survived[:m])),
        params=add(result.params, {**p, "source_model": source_name}),
        methods=add(result.methods, attack),
        subsets=add(result.subsets, m),
        attacked=add(result.attacked, ran),
        survived=add(result.survived, survived),
        preds=add(result.preds, pred),
        batches=add(result.batches, batch),
        seeds=add(result.seeds, seed),
        batch_sizes=add(result.batch_sizes, batch_size),
        sources=add(result.sources, "transfer"),
    )
