"""The supernet's loss under fixed mixing weights, as the perturbation selection measures it:
batch statistics (train mode) with every running statistic restored afterwards, optionally on an
attack's examples made against the very supernet being measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attack",
    "Batch",
    "FixedWeights",
    "attacked",
    "frozen_statistics",
    "supernet_loss",
    "supernet_losses",
]

Batch = tuple[Tensor, Tensor]
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``attack(net, x, y) -> x_adv`` against ``net`` (an ``x -> logits`` model)."""

_FROZEN: set[int] = set()  # ids of the models inside an outer frozen_statistics


@contextmanager
def frozen_statistics(model: nn.Module):
    """Train mode (batch statistics) with every buffer (BN running mean/var/count) restored.

    Re-entrant: inside an outer use only the outer one saves and restores. A train-mode pass
    writes the running statistics but never reads them, so restoring once at the outermost exit
    gives the same losses as restoring after every pass; a selection's 250 passes no longer
    clone and copy every buffer of the supernet each (17 s of a 39 s exact decoding, profiled).
    """
    if id(model) in _FROZEN:
        if not model.training:
            model.train()
        yield
        return
    was_training = model.training
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    model.train()
    _FROZEN.add(id(model))
    try:
        yield
    finally:
        _FROZEN.discard(id(model))
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        model.train(was_training)


class FixedWeights(nn.Module):
    """The supernet under fixed mixing weights, as a plain ``x -> logits`` model that keeps the
    supernet's mode: an attack's eval mode must not swap the batch statistics the selection
    measures with for the supernet's running ones."""

    def __init__(self, model: nn.Module, weights: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.model, self.weights = model, tuple(w.detach() for w in weights)

    def train(self, mode: bool = True) -> FixedWeights:
        self.training = mode  # this wrapper only; the supernet stays as it is
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, weights=self.weights)


def attacked(model: nn.Module, x: Tensor, y: Tensor, weights: tuple, attack: Attack | None):
    """``x``, or ``attack``'s examples against the supernet under ``weights`` (detached)."""
    if attack is None:
        return x
    with torch.enable_grad():
        return attack(FixedWeights(model, weights), x, y).detach()


def supernet_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    weights: tuple[Tensor, ...],
    attack: Attack | None = None,
) -> float:
    """Mean CE of ``model(x, weights=weights)`` over ``batches`` (batch statistics, the running
    statistics untouched); with ``attack``, on its examples against this very supernet."""
    total, n = 0.0, 0
    with frozen_statistics(model):
        for x, y in batches:
            x = attacked(model, x, y, weights, attack)
            with torch.no_grad():
                logits = model(x, weights=weights)
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            n += len(y)
    return total / max(n, 1)


def supernet_losses(
    model: nn.Module, batches: Sequence[Batch], weights: tuple[Tensor, ...]
) -> list[float]:
    """:func:`supernet_loss` under each of ``G`` mixing weights stacked along a leading dim of
    every tensor of ``weights``, from one grouped pass per batch
    (:meth:`rarn.nas.supernet.Supernet.grouped_forward`: each copy of the batch weighed and
    normalised on its own); the same losses up to float rounding."""
    G = weights[0].shape[0]
    total, n = torch.zeros(G, dtype=torch.float64), 0
    with frozen_statistics(model), torch.no_grad():
        for x, y in batches:
            logits = model(x, weights=weights).float()  # [G, B, classes]
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(G), reduction="none")
            total += ce.view(G, -1).sum(1).double().cpu()
            n += len(y)
    return (total / max(n, 1)).tolist()
