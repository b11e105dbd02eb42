"""Adversarial training steps (RACL spec §4): one function per method, one signature.

A step ``(model, x, y, **settings) -> StepOutput`` returns the loss to minimise and the logits to
score; :func:`make_step` binds the settings. The epoch loop (:mod:`rarn.robust.loop`) is written
once; only the step varies (:data:`STEPS`):

* ``standard``: cross-entropy on clean inputs.
* ``pgd``: Madry et al. 2018 (arXiv:1706.06083) PGD-AT, ``min_W E max_{||d||_inf <= eps}
  CE(F(x + d), y)`` (spec Eq. 1), the inner max by the attack registry (PGD-7, 8/255, 2/255).
* ``trades``: Zhang et al. 2019 (arXiv:1901.08573), ``CE(F(x), y) + beta KL(F(x) || F(x'))`` with
  ``x'`` maximising the KL term.
* ``fast``: Wong et al. 2020 (arXiv:2001.03994) Fast-AT, FGSM from a uniform random start with
  step ``1.25 eps`` (one PGD step).

Inner maximisations run in eval mode with frozen weights (:func:`rarn.models.common.eval_mode`):
BN uses running statistics, drop-path and the auxiliary head are off, and the backward pass
computes input gradients only, so a PGD-k step costs about ``(2k + 3) / 3`` clean steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.models.common import eval_mode
from rarn.models.inference import FoldedModel
from rarn.robust.attacks import AttackFn, get_attack

__all__ = [
    "STEPS",
    "StepFn",
    "StepOutput",
    "fast_step",
    "make_step",
    "pgd_step",
    "standard_step",
    "trades_step",
]


class StepOutput(NamedTuple):
    """What a step function returns: the loss to minimise and the logits to score."""

    loss: Tensor  # scalar
    logits: Tensor  # (B, K), on the inputs the weights were trained on (adversarial for AT)


StepFn = Callable[[nn.Module, Tensor, Tensor], StepOutput]


def _ce(out: Tensor | tuple[Tensor, Tensor], y: Tensor, auxiliary_weight: float) -> StepOutput:
    """Cross-entropy of the main logits plus the weighted auxiliary-head term (DARTS)."""
    if isinstance(out, tuple):
        logits, aux = out
        loss = F.cross_entropy(logits, y)
        if auxiliary_weight > 0:
            loss = loss + auxiliary_weight * F.cross_entropy(aux, y)
        return StepOutput(loss, logits)
    return StepOutput(F.cross_entropy(out, y), out)


def _attack_target(model: nn.Module, attack_model: nn.Module | None) -> nn.Module:
    """What an inner maximisation runs on: ``attack_model`` (a folded copy brought up to date
    with ``model`` first) or ``model``."""
    if attack_model is None:
        return model
    if isinstance(attack_model, FoldedModel):
        attack_model.refresh()
    return attack_model


def _main(out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def standard_step(
    model: nn.Module, x: Tensor, y: Tensor, *, auxiliary_weight: float = 0.0
) -> StepOutput:
    """Clean cross-entropy (the non-adversarial baseline)."""
    return _ce(model(x), y, auxiliary_weight)


def pgd_step(
    model: nn.Module, x: Tensor, y: Tensor, *,
    eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 7,
    generator: torch.Generator | None = None, attack: str | AttackFn = "pgd",
    auxiliary_weight: float = 0.0, attack_model: nn.Module | None = None,
) -> StepOutput:  # fmt: skip
    """Madry PGD-AT: cross-entropy on PGD-``steps`` examples from the attack registry.

    Args:
        model: the network (in training mode).
        x: clean inputs in [0, 1].
        y: labels.
        eps: L-inf radius.
        step_size: attack step.
        steps: attack iterations.
        generator: draws the random start (on ``x``'s device).
        attack: registry name or attack function.
        auxiliary_weight: weight of the auxiliary-head loss.
        attack_model: what the inner maximisation runs on (default: ``model``): e.g. the
            model's :func:`~rarn.models.inference.folded_copy` (the same eval-mode function,
            cheaper passes), refreshed here from ``model``'s current weights and statistics.

    Returns:
        The loss on the adversarial batch and its logits.
    """
    fn = get_attack(attack) if isinstance(attack, str) else attack
    target = _attack_target(model, attack_model)
    x_adv = fn(target, x, y, eps=eps, step_size=step_size, steps=steps, generator=generator)
    return _ce(model(x_adv), y, auxiliary_weight)


def fast_step(
    model: nn.Module, x: Tensor, y: Tensor, *,
    eps: float = 8 / 255, step_size: float | None = None,
    generator: torch.Generator | None = None, auxiliary_weight: float = 0.0,
    attack_model: nn.Module | None = None,
) -> StepOutput:  # fmt: skip
    """Fast-AT (Wong et al. 2020): one FGSM step of ``1.25 eps`` from a uniform random start.

    This is exactly one PGD step with a random start, so it reuses the registry's ``pgd``.
    ``step_size`` overrides the ``1.25 eps`` step.
    """
    alpha = 1.25 * eps if step_size is None else step_size
    knobs = {"eps": eps, "step_size": alpha, "steps": 1, "generator": generator}
    return pgd_step(
        model, x, y, auxiliary_weight=auxiliary_weight, attack_model=attack_model, **knobs
    )


def _trades_adversary(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None,
) -> Tensor:
    """TRADES inner max: sign-gradient ascent on ``KL(F(x) || F(x'))`` in the eps-ball."""
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), dim=1)
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        x_adv = (x + 0.001 * noise.to(x.device)).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_nat, reduction="sum")
            (g,) = torch.autograd.grad(kl, x_adv)
            x_adv = x_adv.detach() + step_size * g.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_step(
    model: nn.Module, x: Tensor, y: Tensor, *,
    eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 7, beta: float = 6.0,
    generator: torch.Generator | None = None, auxiliary_weight: float = 0.0,
) -> StepOutput:  # fmt: skip
    """TRADES: ``CE(F(x), y) + beta * KL(F(x) || F(x_adv))`` (batch mean), KL inner max.

    Returns:
        The loss and the *clean* logits (TRADES trains on both; clean accuracy is reported).
    """
    x_adv = _trades_adversary(
        model, x.detach(), eps=eps, step_size=step_size, steps=steps, generator=generator
    )
    nat = _ce(model(x), y, auxiliary_weight)
    log_p_adv = F.log_softmax(_main(model(x_adv)).float(), dim=1)
    robust = F.kl_div(log_p_adv, F.softmax(nat.logits.float(), dim=1), reduction="batchmean")
    return StepOutput(nat.loss + beta * robust, nat.logits)


STEPS: dict[str, Callable[..., StepOutput]] = {
    "standard": standard_step,
    "pgd": pgd_step,
    "trades": trades_step,
    "fast": fast_step,
}
"""Training-method name -> step function ``(model, x, y, **knobs) -> StepOutput``."""


def make_step(name: str, **kwargs: Any) -> StepFn:
    """A step function from :data:`STEPS` with its knobs bound (unknown knobs raise TypeError).

    Args:
        name: ``standard``, ``pgd``, ``trades`` or ``fast``.
        **kwargs: keyword arguments of that step (``eps``, ``steps``, ``generator``, ...).

    Returns:
        ``step(model, x, y) -> StepOutput``.
    """
    try:
        fn = STEPS[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; known: {', '.join(STEPS)}") from None
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"step {name!r} takes no {unknown}; it takes {list(params)[3:]}")
    return partial(fn, **kwargs)
