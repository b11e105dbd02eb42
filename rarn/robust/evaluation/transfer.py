"""Black-box transfer: adversarial examples crafted on one model, evaluated on another.

A transfer matrix (source x target) shows how far adversarial examples carry between models. A
target that resists its own white-box attack but falls to examples crafted on another model
suggests masked gradients (Athalye et al. 2018, https://arxiv.org/abs/1802.00420).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from rarn.models.common import device_of
from rarn.robust.attacks import get_attack
from rarn.robust.evaluation._core import Data, _batches, _check_budget, _predict
from rarn.robust.evaluation.results import TRANSFER_SCHEMA, _attack_row, _with_intervals

__all__ = ["transfer_matrix"]


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
