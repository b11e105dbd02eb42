"""The weight step's loss ``CE + gamma E_x ||grad_x CE||_2`` and its weight gradient (spec §2.6).

The gradient-norm term's weight gradient is ``(d g_x / dW)^T g_x / ||g_x||``, i.e. the weight
gradient of the directional derivative ``g_x . d`` along the unit input gradient ``d`` held
fixed. Two ways to get it (``SearchConfig.grad_norm_mode``):

* ``exact``: double backprop (``create_graph=True``), about 3x a plain weight step.
* ``finite_difference`` (default): ``(l(x + h d) - l(x)) / h`` with a second forward/backward at
  ``x + h d`` in which every kink keeps the state it had at ``x``: each ReLU reuses the clean
  pass's mask, each max pool its argmax (:class:`_Kinks`). The perturbed loss is then a smooth
  function with the clean loss's input gradient at ``x``, so the quotient's weight gradient tends
  to the exact one as ``h -> 0`` (double backprop also holds every ReLU mask and argmax fixed).
  Without the frozen kinks, units that change side between ``x`` and ``x + h d`` add a term that
  does not vanish with ``h``: measured cosine with the exact weight gradient 0.43 at ``h = 0.01``
  and 0.16 at ``1e-3`` on the search supernet, against 0.9999 with them (``tests/test_gradnorm.py``,
  ``benchmarks/search_step.py``). About 2.1x a plain weight step.

Batch norm: the perturbed pass normalises with its own batch statistics, as the clean pass does
(train mode; the exact term differentiates through them too), but leaves the running statistics
alone (:func:`frozen_bn_statistics`): they feed the Lipschitz constants of the bound and must see
the data, not ``x + h d``. The running statistics after a step are those of a step without the term.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["WeightGrads", "frozen_bn_statistics", "weight_gradients"]

_RELU = (F.relu, torch.relu, Tensor.relu)
_POOL_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)


@dataclass
class WeightGrads:
    """The weight step's gradients (in ``params`` order), loss, logits of the clean pass and the
    batch mean of ``||grad_x CE||`` (``None`` without the term)."""

    grads: list[Tensor]
    loss: Tensor
    logits: Tensor
    grad_norm: float | None = None


def weight_gradients(
    model: nn.Module,
    params: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    z: Any,
    gamma: float,
    mode: str = "finite_difference",
    fd_step: float = 0.01,
) -> WeightGrads:
    """Gradients of ``CE + gamma * mean_i ||grad_{x_i} CE||`` with respect to ``params``.

    Args:
        model: called as ``model(x, z)`` in its current (train) mode.
        params: the weights to differentiate.
        x, y: the batch.
        z: architecture logits passed to the model.
        gamma: weight of the gradient-norm term (0: plain CE, one forward/backward).
        mode: ``exact`` (double backprop) or ``finite_difference`` (frozen kinks).
        fd_step: the finite-difference step ``h`` along the unit input gradient.
    """
    if gamma == 0:
        logits = model(x, z)
        loss = F.cross_entropy(logits, y)
        return WeightGrads(list(torch.autograd.grad(loss, params)), loss.detach(), logits)
    x = x.detach().requires_grad_(True)
    if mode == "exact":
        logits = model(x, z)
        per = F.cross_entropy(logits, y, reduction="none")
        (gx,) = torch.autograd.grad(per.sum(), x, create_graph=True)
        gnorm = gx.flatten(1).norm(dim=1)
        loss = per.mean() + gamma * gnorm.mean()
        grads = list(torch.autograd.grad(loss, params))
        return WeightGrads(grads, loss.detach(), logits, float(gnorm.detach().mean()))
    if mode != "finite_difference":
        raise ValueError(f"unknown grad_norm_mode {mode!r}; known: exact, finite_difference")
    kinks = _Kinks()
    with kinks:
        logits = model(x, z)
    per = F.cross_entropy(logits, y, reduction="none")
    g0 = torch.autograd.grad(per.sum(), [x, *params])
    gx, gw0 = g0[0], g0[1:]
    gnorm = gx.flatten(1).norm(dim=1)
    d = gx / gnorm.clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    with frozen_bn_statistics(model), kinks.replay():
        per2 = F.cross_entropy(model(x.detach() + fd_step * d, z), y, reduction="none")
    kinks.check_consumed()
    gw1 = torch.autograd.grad(per2.sum(), params)
    # d/dW [mean(l) + gamma mean((l2 - l) / h)] from the two per-pass gradients of sum(l), sum(l2)
    B = x.shape[0]
    a, b = (1.0 - gamma / fd_step) / B, (gamma / fd_step) / B
    grads = [a * g0_ + b * g1_ for g0_, g1_ in zip(gw0, gw1)]
    loss = per.mean() + gamma * ((per2 - per) / fd_step).mean()
    return WeightGrads(grads, loss.detach(), logits, float(gnorm.detach().mean()))


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Batch norms in ``model`` normalise with batch statistics but leave their running
    statistics (and ``num_batches_tracked``) untouched (``track_running_stats=False`` for the
    duration; the fused kernels honour it as ``nn.BatchNorm2d`` does)."""
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class _Kinks(TorchFunctionMode):
    """Records the ReLU masks and max-pool argmaxes of a forward pass, in call order, and replays
    them in a later pass of the same model (ReLU -> ``x * mask``, max pool -> gather at the
    recorded argmax): the later pass is the clean pass's linearisation at its kinks.

    Only ``F.relu``/``torch.relu``/``Tensor.relu`` and ``F.max_pool2d`` are frozen (the only kinks
    of the search supernet); the replay checks that the calls come in the recorded order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kinks: list[tuple[str, Tensor]] = []
        self._next: int | None = None  # replay position; None while recording

    @contextmanager
    def replay(self) -> Iterator[None]:
        self._next = 0
        with self:
            yield

    def check_consumed(self) -> None:
        if self._next != len(self.kinks):
            raise RuntimeError(
                f"frozen-kink replay used {self._next} of {len(self.kinks)} recorded kinks: the "
                "perturbed pass took another path than the clean one"
            )

    def _recorded(self, kind: str) -> Tensor:
        assert self._next is not None
        if self._next >= len(self.kinks) or self.kinks[self._next][0] != kind:
            raise RuntimeError(f"frozen-kink replay: unexpected {kind} at call {self._next}")
        self._next += 1
        return self.kinks[self._next - 1][1]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _RELU:
            x = args[0]
            if self._next is not None:
                return x * self._recorded("relu")
            self.kinks.append(("relu", x > 0))
            return func(*args, **kwargs)
        if func is F.max_pool2d:
            bound = _POOL_SIGNATURE.bind(*args, **kwargs)
            want_indices = bound.arguments.get("return_indices", False)
            x = bound.arguments["input"]
            if self._next is not None:
                idx = self._recorded("max_pool")
                out = x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            else:
                bound.arguments["return_indices"] = True
                out, idx = F.max_pool2d_with_indices(*bound.args, **bound.kwargs)
                self.kinks.append(("max_pool", idx))
            return (out, idx) if want_indices else out
        return func(*args, **kwargs)
