"""The primitives every evaluation is built from: batches of data, and attacking survivors.

Only points still classified correctly are attacked (a misclassified point is never robust), so
each attack costs only what the earlier evidence has not settled (AutoAttack's ``robust_flags``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rarn.models.common import eval_mode
from rarn.models.inference import FoldedModel, folded_copy
from rarn.robust.attacks import get_attack, validate_attack_args

logger = logging.getLogger(__name__)

Data = Iterable[Sequence[Tensor]] | tuple[Tensor, Tensor]
"""A loader yielding ``(x, y, ...)`` batches, or one ``(x, y)`` pair of tensors."""


def _batches(data: Data, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the number of points: {len(x)} vs {len(y)}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    for batch in data:
        yield batch[0], batch[1]


MODEL_FORMS: dict[bool, str] = {False: "as_given", True: "bn_folded"}
"""Whether the attacks ran on the folded copy -> the ``model_form`` a result records: the model
as given, or its copy with the batch norms folded (:func:`~rarn.models.inference.folded_copy`)."""


def attack_model(
    model: nn.Module, fold: bool, device: torch.device | str | None = None
) -> nn.Module:
    """What an evaluation's attacks run on: ``model``'s folded copy when ``fold`` and the model
    can be copied (else, with a warning, the model itself)."""
    try:
        return model_in_form(model, MODEL_FORMS[fold], device)
    except (TypeError, RuntimeError, copy.Error) as e:
        logger.warning("cannot copy %s to fold its batch norms (%s): attacking it as given",
                       type(model).__name__, e)  # fmt: skip
        return model


def model_form(net: nn.Module) -> str:
    """The ``model_form`` of what the attacks ran on (:func:`attack_model`), after they ran: a
    folded copy whose first-call check failed fell back to the model as given."""
    return MODEL_FORMS[isinstance(net, FoldedModel) and bool(net.active)]


def model_in_form(
    model: nn.Module, form: str, device: torch.device | str | None = None
) -> nn.Module:
    """What the attacks of a result whose ``model_form`` is ``form`` ran on, rebuilt from
    ``model`` (ValueError: an unknown form)."""
    if form == MODEL_FORMS[True]:
        return folded_copy(model, device)
    if form == MODEL_FORMS[False]:
        return model
    raise ValueError(f"unknown model_form {form!r}; known: {sorted(MODEL_FORMS.values())}")


def _check_budget(eps: float, step_size: float, steps: int) -> None:
    """The attack's own check of its budget, before any data is touched (ValueError)."""
    dummy = torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    validate_attack_args(*dummy, eps=eps, step_size=step_size, steps=steps)


def _fraction(mask: Tensor) -> float:
    """Accuracy as ``count / n`` in float64, so per-image records recombine to it exactly."""
    return int(mask.sum()) / mask.numel()


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return model(x).argmax(dim=1)


def attack_seed(seed: int, name: str) -> int:
    """The seed of the attack called ``name`` in an evaluation seeded ``seed``: one generator per
    attack, so that adding, removing or reordering attacks changes no other attack's draws."""
    digest = hashlib.sha256(f"rarn-attack-seed/1 {int(seed)} {name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: any torch seed


def batch_generator(seed: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one attack (``seed``: :func:`attack_seed`) on its batch number ``batch``:
    a batch, hence a row of the records, can be rerun alone (``rarn.robust.evaluation.verify``)."""
    digest = hashlib.sha256(f"rarn-batch-seed/1 {int(seed)} {int(batch)}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _attack_preds(
    model: nn.Module,
    name: str,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    generator: torch.Generator,
    params: Mapping[str, Any],
) -> Tensor:
    """Attack the points where ``mask`` holds with the registry attack ``name``; their predicted
    labels after the attack (int64, -1 where ``mask`` does not hold)."""
    out = torch.full_like(y, -1, dtype=torch.long)
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x_adv = get_attack(name)(model, x[idx], y[idx], generator=generator, **params)
        out[idx] = _predict(model, x_adv)
    return out


def _survives(
    model: nn.Module,
    name: str,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    generator: torch.Generator,
    params: Mapping[str, Any],
) -> Tensor:
    """Attack the points where ``mask`` holds with the registry attack ``name``; return where
    they are still classified right (False where ``mask`` does not hold)."""
    return _attack_preds(model, name, x, y, mask, generator, params) == y
