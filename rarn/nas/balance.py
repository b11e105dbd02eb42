"""The architecture step's gradient: the validation CE balanced against the chance constraint.

The augmented Lagrangian ``CE + y h + rho/2 max(0, h)^2`` has the gradient
``g_CE + c grad h`` with ``c = y + rho max(0, h)``. Taken as it is (``balance="none"``, the
spec's form), it reaches the optimiser at 270-4,600 times the CE's gradient on the architecture
means (CIFAR subset, docs/constraint.md), and Adam, which normalises per coordinate by a running
second moment, turns that into equal-size moves of every mean in the penalty's sign until the
constraint is met; afterwards the second moment still holds the penalty's scale, so the CE moves
the means by 1e-4 per epoch where it moves them by 0.02-0.03 without the constraint. The search
then decodes whatever the penalty's first steps left behind.

``balance="ce_norm"`` (default) rescales the constraint's gradient to the CE's gradient norm on
the means: ``g = g_CE + c (||g_CE,mu|| / ||grad_mu h||) grad h``. The dual variable ``y`` then
reads in units of the CE's pull (``y = 1``: the constraint pulls as hard as the CE), the
combined gradient stays at the CE's scale (so Adam's second moment does too, and the CE moves the
means at its own rate whenever the constraint lets it), and the constraint still gets what it
must: ``y`` grows by ``rho h`` per step for as long as ``h > 0``. Only the direction of
``grad h`` is used, so the bound's scale (product or per-node mean) no longer sets the balance.

:class:`ArchDiagnostics` turns the per-step quantities into per-epoch metrics: the ratio of the
applied constraint gradient to the CE's, the chance part's share, and how far the means move,
in all and while the constraint is met.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BALANCES",
    "METRICS",
    "ArchDiagnostics",
    "BalanceRule",
    "arch_gradients",
    "confidence_share",
]

_TINY = 1e-30


@dataclass(frozen=True)
class BalanceRule:
    """How the constraint's gradient is weighed against the CE's.

    Attributes:
        scale: ``(||g_CE,mu||, ||grad_mu h||) -> s``, the factor on ``coef * grad h``.
        relative: the chance constraint measures ``h`` in units of its demand
            (:class:`rarn.nas.constraint.ChanceConstraint`'s ``relative``), so that ``rho`` is per
            unit of relative violation whatever the bound's scale.
    """

    scale: Callable[[float, float], float]
    relative: bool


BALANCES: dict[str, BalanceRule] = {
    "none": BalanceRule(lambda ce_n, h_n: 1.0, relative=False),  # the spec's form
    "ce_norm": BalanceRule(lambda ce_n, h_n: ce_n / max(h_n, _TINY), relative=True),
}
"""``constraint.balance`` -> its rule (a new balance is one entry here; the config checks a name
against this table: :mod:`rarn.nas.choices`)."""
_STEP_KEYS = ("penalty_ce_ratio", "bound_ce_ratio", "chance_pull", "confidence_share")
METRICS: tuple[str, ...] = (*_STEP_KEYS, "mu_move", "mu_move_met", "sigma_mean")
"""What :meth:`ArchDiagnostics.metrics` adds to every epoch with architecture steps."""


def _grads(out: Tensor, params: Sequence[Tensor], retain: bool = False) -> list[Tensor]:
    """``d out / d params`` with zeros for parameters ``out`` does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(p) for p in params]
    gs = torch.autograd.grad(out, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def _norm(gs: Sequence[Tensor]) -> float:
    return float(torch.sqrt(sum((g.detach() ** 2).sum() for g in gs)))


def arch_gradients(
    ce: Tensor,
    mu_f: Tensor,
    sigma_f: Tensor,
    z_eta: float,
    coef: float,
    params: Sequence[Tensor],
    is_mean: Sequence[bool],
    balance: str = "ce_norm",
) -> tuple[list[Tensor], dict[str, float]]:
    """The architecture gradient ``g_CE + coef * scale * grad h`` and its diagnostics.

    Args:
        ce: validation CE of the sampled architecture.
        mu_f, sigma_f: the bound's log-normal moments; ``h = mu_F + z_eta sigma_F - const``.
        z_eta: ``Phi^{-1}(eta)``.
        coef: ``dL/dh`` of the augmented Lagrangian, ``y + rho max(0, h)`` (0: inactive).
        params: the architecture parameters; ``is_mean`` marks the means ``mu``.
        balance: one of :data:`BALANCES`.

    Returns:
        The gradient per parameter, and ``penalty_ce_ratio`` (applied constraint gradient over
        CE gradient, on the means), ``bound_ce_ratio`` (``||grad_mu h|| / ||g_CE,mu||``, the raw
        scale mismatch) and ``chance_pull`` (``||z grad_mu sigma_F|| / ||grad_mu mu_F||``, how
        much of the constraint's direction on the means is the chance part's).
    """
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; known: {', '.join(BALANCES)}")
    g_ce = _grads(ce, params)
    g_mf = _grads(mu_f, params, retain=True)
    g_sf = _grads(sigma_f, params)
    g_h = [a + z_eta * b for a, b in zip(g_mf, g_sf)]

    def on_means(gs: Sequence[Tensor]) -> float:
        return _norm([g for g, m in zip(gs, is_mean) if m])

    ce_n, h_n = on_means(g_ce), on_means(g_h)
    scale = BALANCES[balance].scale(ce_n, h_n)
    grads = [a + (coef * scale) * b for a, b in zip(g_ce, g_h)]
    stats = {
        "penalty_ce_ratio": coef * scale * h_n / max(ce_n, _TINY),
        "bound_ce_ratio": h_n / max(ce_n, _TINY),
        "chance_pull": z_eta * on_means(g_sf) / max(on_means(g_mf), _TINY),
    }
    return grads, stats


def confidence_share(chance: float, margin: float) -> float:
    """The chance part's share of what the constraint asks of the reference architecture.

    ``chance = Phi^{-1}(eta) sigma_F`` and ``margin = f(mu_ref) - ln lambda_bar`` (``kappa
    |f(mu_ref)|`` for the relative and tracking thresholds), so at the reference means
    ``h = margin + chance``; the share is ``chance / (chance + margin)`` (0.5: the chance part
    asks as much as the mean part; ``ratio / (1 + ratio)`` of issue 12's ``chance / margin``).
    """
    margin = max(margin, 0.0)
    return chance / (chance + margin) if chance + margin > 0 else 0.0


@dataclass
class ArchDiagnostics:
    """One epoch's architecture steps, summed: step metrics and the means' displacement.

    ``mu_move`` is the mean over all architecture means of ``|mu_end - mu_start|`` (net movement
    in the epoch), ``mu_move_met`` the same over the steps taken while the constraint was met
    (``h <= 0``), i.e. where only the CE (and a draining dual) moves the means.
    """

    keys: tuple[str, ...] = _STEP_KEYS
    sums: Counter = field(default_factory=Counter)
    steps: int = 0
    moved: list[Tensor] | None = None
    moved_met: list[Tensor] | None = None

    def record(self, stats: dict[str, float], delta: Sequence[Tensor], met: bool) -> None:
        self.sums.update({k: stats[k] for k in self.keys})
        self.steps += 1
        delta = [d.detach().double().cpu() for d in delta]
        self.moved = delta if self.moved is None else [a + b for a, b in zip(self.moved, delta)]
        if met:
            mm = self.moved_met
            self.moved_met = delta if mm is None else [a + b for a, b in zip(mm, delta)]

    def metrics(self, sigma: Sequence[Tensor]) -> dict[str, float]:
        """The epoch's means of the step metrics and the displacements (nothing before the
        first architecture step); ``sigma_mean`` is the mean ``sigma`` of the op logits now."""
        if not self.steps:
            return {}
        out = {k: self.sums[k] / self.steps for k in self.keys}
        out["mu_move"] = _mean_abs(self.moved)
        out["mu_move_met"] = _mean_abs(self.moved_met) if self.moved_met else 0.0
        out["sigma_mean"] = float(torch.cat([s.detach().flatten() for s in sigma]).mean())
        return out


def _mean_abs(ts: Sequence[Tensor] | None) -> float:
    flat = torch.cat([t.flatten() for t in ts]) if ts else torch.zeros(1)
    return float(flat.abs().mean())
