"""Adaptive attacks for models whose gradients mislead: BPDA and EOT (Athalye et al. 2018).

'Obfuscated Gradients Give a False Sense of Security' [https://arxiv.org/abs/1802.00420]:

* **BPDA** (Backward Pass Differentiable Approximation): a non-differentiable or shattered input
  transform ``g`` with ``g(x) ~ x`` is kept in the forward pass and replaced by the identity in
  the backward pass (straight-through). :func:`bpda` is PGD on such a surrogate
  (:func:`bpda_surrogate`); the images it finds are judged on the real model by the caller.
* **EOT** (Expectation over Transformation): a randomised model is attacked through the
  expectation of its output over its randomness; :func:`pgd_eot` is PGD on
  ``-log E[softmax(f(x))]`` estimated from ``samples`` forward passes per step.

The surrogate of :func:`bpda_surrogate`, in order:

1. **The hook**: a model that preprocesses its input exposes ``input_transform`` (a callable,
   ``x -> g(x)``) and ``classifier`` (a module), with
   ``model(x) == classifier(input_transform(x))``.
   The surrogate is ``classifier(x + (g(x) - x).detach())``: the same forward values, the
   gradient of the classifier at ``g(x)``. This is exact BPDA; it is checked on the batch (the
   surrogate must reproduce the model's logits) and refused otherwise.
2. **The fallback**, for any other model: the model's own forward, with the rounding functions
   of torch (``round``, ``floor``, ``ceil``, ``trunc``, ``sign``, as functions or tensor
   methods) made straight-through by a ``TorchFunctionMode``. It removes the zero gradients of
   quantisation and thresholds wherever they are written with those functions; it cannot see a
   transform that is differentiable but shattered (e.g. ``x + a sin(k x)``), a custom autograd
   function, or non-torch code. Those models need the hook; without it the longer Square and the
   transfer attacks are what the evaluation has against them (docs/evaluation.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from rarn.robust.attacks.gradient import pgd
from rarn.robust.attacks.interface import Budget, uniform_attack

__all__ = ["StraightThrough", "bpda", "bpda_surrogate", "pgd_eot"]

_ROUNDING = {
    torch.round, torch.floor, torch.ceil, torch.trunc, torch.sign,
    Tensor.round, Tensor.floor, Tensor.ceil, Tensor.trunc, Tensor.sign,
}  # fmt: skip


class StraightThrough(TorchFunctionMode):
    """Rounding functions of torch with an identity backward: ``x + (round(x) - x).detach()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _ROUNDING and isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
            x = args[0]
            if x.requires_grad and out.shape == x.shape and out.is_floating_point():
                return x + (out - x).detach()
        return out


class _HookSurrogate(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        g = self.model.input_transform(x)
        return self.model.classifier(x + (g - x).detach())


class _ModeSurrogate(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with StraightThrough():
            return self.model(x)


def bpda_surrogate(model: nn.Module) -> nn.Module:
    """The differentiable surrogate of ``model`` BPDA attacks (see the module docstring): the
    ``input_transform`` / ``classifier`` hook if the model has it, else the straight-through
    rounding fallback. Same forward values as the model; only the backward pass differs."""
    if callable(getattr(model, "input_transform", None)) and callable(
        getattr(model, "classifier", None)
    ):
        return _HookSurrogate(model)
    return _ModeSurrogate(model)


@uniform_attack
def bpda(model: nn.Module, x: Tensor, y: Tensor, b: Budget, *, random_start: bool = True) -> Tensor:
    r"""BPDA-PGD from 'Obfuscated Gradients Give a False Sense of Security'
    [https://arxiv.org/abs/1802.00420] (Athalye et al., ICML 2018), section 4.1.

    Distance measure: L-inf. :func:`~rarn.robust.attacks.pgd` (random start, sign steps,
    projection) on :func:`bpda_surrogate` of ``model``: non-differentiable or shattered input
    preprocessing is straight-through in the backward pass. The surrogate must reproduce the
    model's logits on ``x`` (else ValueError: the hook is wrong); the caller judges the result on
    the real model.

    Example:
        >>> x_adv = bpda(quantised_model, x, y, eps=8 / 255, step_size=2 / 255, steps=100)
    """
    surrogate = bpda_surrogate(model)
    with torch.no_grad():
        same = torch.allclose(surrogate(x), model(x), rtol=1e-4, atol=1e-5)
    if not same:
        raise ValueError("bpda: the surrogate's logits differ from the model's; check the hook")
    return pgd(
        surrogate,
        x,
        y,
        eps=b.eps,
        step_size=b.step_size,
        steps=b.steps,
        generator=b.generator,
        random_start=random_start,
    )


class _Expectation(nn.Module):
    """``log E[softmax(f(x))]`` over ``samples`` forward passes: the EOT logits."""

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.model, self.samples = model, samples

    def forward(self, x: Tensor) -> Tensor:
        logp = torch.stack([F.log_softmax(self.model(x), dim=1) for _ in range(self.samples)])
        return torch.logsumexp(logp, dim=0) - math.log(self.samples)  # (N, K)


@uniform_attack
def pgd_eot(model: nn.Module, x: Tensor, y: Tensor, b: Budget, *, samples: int = 20) -> Tensor:
    r"""EOT-PGD from 'Obfuscated Gradients Give a False Sense of Security'
    [https://arxiv.org/abs/1802.00420] (Athalye et al., ICML 2018), section 4.1, and 'Synthesizing
    Robust Adversarial Examples' [https://arxiv.org/abs/1707.07397].

    Distance measure: L-inf. PGD with a random start on the cross-entropy of
    ``log E[softmax(f(x))]``, the expectation estimated from ``samples`` forward passes of the
    randomised model per step (``steps * samples`` passes in all). The model's own randomness is
    its own (a randomised defence draws from torch's global RNG); ``generator`` draws the start.

    Example:
        >>> x_adv = pgd_eot(noisy_model, x, y, eps=8 / 255, step_size=2 / 255, steps=20)
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    return pgd(
        _Expectation(model, samples),
        x,
        y,
        eps=b.eps,
        step_size=b.step_size,
        steps=b.steps,
        generator=b.generator,
    )
