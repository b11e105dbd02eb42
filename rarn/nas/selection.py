"""The end of a search: every decoding of the supernet, its collapse report, and the remedy.

* Magnitude rules (:mod:`rarn.nas.decode`: ``quantile``, ``median``, ``sample``) read the
  distributions; perturbation rules (:mod:`rarn.nas.perturbation`: ``perturbation``,
  ``perturbation_robust``) ask the supernet what each op is worth on D_V. Every search decodes by
  all magnitude rules and by ``perturbation`` (plus the configured rule), and reports each
  genotype's collapse signals, so the rules can be compared on every run.
* ``search.decode_objective``: ``ce`` measures an op by the validation CE alone (darts-pt);
  ``lagrangian`` by the objective the architecture step descends, the CE plus the chance
  constraint's term at the search's final dual and balance (:func:`lagrangian_penalty`), so the
  constraint reaches the genotype through the selection as it reached the means. [ours]
* The remedy (``search.decode_max_param_free``, P-DARTS): when the configured decoding trips the
  collapse detector, at most that many parameter-free edges per cell survive; the others take
  their edge's best convolution by the rule's own scores. The uncapped genotype stays in the
  decodings (``<rule>_uncapped``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rarn.nas.collapse import CollapseLimits, CollapseReport, cell_log_lipschitz, detect_collapse
from rarn.nas.constraint import log_bound
from rarn.nas.decode import (
    MAGNITUDE_DECODERS,
    PERTURBATION_DECODERS,
    cap_parameter_free,
    quantile_logits,
)
from rarn.nas.genotype import Genotype
from rarn.nas.perturbation import (
    Attack,
    Importance,
    Penalty,
    frozen_statistics,
    perturbation_select,
)
from rarn.nas.supernet import ArchSample

__all__ = [
    "Selection",
    "base_logits",
    "decode_search",
    "lagrangian_penalty",
    "robust_attack",
    "selection_batches",
]

log = logging.getLogger(__name__)
_KEYS = ("normal", "reduce", "normal_edges", "reduce_edges")  # ArchSample's field order


@dataclass
class Selection:
    """The chosen genotype (``rule``), every decoding and every decoding's collapse report."""

    rule: str
    genotype: Genotype
    genotypes: dict[str, Genotype]
    reports: dict[str, CollapseReport]
    importance: dict[str, Importance]

    @property
    def report(self) -> CollapseReport:
        return self.reports[self.rule]


def selection_batches(s: Any, dataset: Any) -> list[tuple[Tensor, Tensor]]:
    """The first ``search.decode_n`` images of ``dataset`` (D_V) as fixed batches on the search's
    device."""
    from rarn.data import make_loader

    cfg, out, seen = s.cfg, [], 0
    for x, y in make_loader(dataset, 2 * cfg.batch_size, shuffle=False):
        x, y = x[: cfg.decode_n - seen].to(s.device), y[: cfg.decode_n - seen].to(s.device)
        out.append((x, y))
        seen += len(y)
        if seen >= cfg.decode_n:
            break
    return out


def robust_attack(s: Any) -> Attack:
    """The attack of ``perturbation_robust``: PGD at ``robust_eval_eps`` (``robust_eval_steps``
    steps of 2.5 eps / steps, random start from a generator seeded by the search seed), made
    anew against every candidate supernet."""
    from rarn.robust.attacks import get_attack

    cfg, pgd = s.cfg, get_attack("pgd")
    eps, steps = cfg.robust_eval_eps, cfg.robust_eval_steps
    gen = torch.Generator(device=s.device).manual_seed(cfg.seed + 4)
    kw = {"eps": eps, "step_size": 2.5 * eps / steps, "steps": steps, "generator": gen}
    return lambda net, x, y: pgd(net, x, y, **kw)


def base_logits(s: Any) -> ArchSample:
    """The architecture perturbation starts from: the eta-lower quantile of the logits, or the
    means of a deterministic (``sampling=False``) search."""
    if not s.cfg.sampling:
        return ArchSample(*(t.detach() for t in s.model.arch.mu().as_tuple()))
    return quantile_logits(s.model, s.ccfg.eta)


def lagrangian_penalty(
    s: Any, batches: list[tuple[Tensor, Tensor]], base: ArchSample
) -> tuple[Penalty | None, float]:
    """The chance constraint's term of the architecture step's Lagrangian, as a function of the
    supernet's mixing weights: ``w -> c * scale * f(w)``.

    The architecture step descends ``CE + c * scale * h`` with ``c = y + rho max(0, h / unit)``
    and ``scale`` the balance (``ce_norm``: ``||dCE/dmu|| / ||dh/dmu||``, :mod:`rarn.nas.balance`;
    ``none``: 1); ``h = f(mu) + Phi^{-1}(eta) sigma_F - ln lambda_bar``. Here ``c``, ``scale`` and
    the threshold are those of the finished search (the CE's gradient on ``batches`` at the
    logits ``base``, as the selection evaluates the supernet), and ``f(w)`` is the bound of the
    supernet with the mixing weights ``w`` (:func:`rarn.nas.constraint.log_bound`,
    ``log_weights``): a removal's rise of the objective is its CE rise plus ``c * scale`` times
    its bound's rise. The chance part ``sigma_F`` is a constant of the removal (a selected
    architecture is deterministic) and drops out of the differences.

    Returns:
        ``(penalty, c * scale)``; ``(None, 0.0)`` when the constraint is off or inactive at the
        end of the search (``c = 0``: the selection is the CE's alone).
    """
    c, cc = s.ccfg, s.constraint
    if not c.enabled:
        return None, 0.0
    inputs = s.bound_inputs(update=False)
    mus = s.model.arch.mu().as_tuple()
    with torch.enable_grad():
        mu_f, sigma_f = s.moments(inputs)
        cc.update_threshold(s.model.arch.mu(), inputs, c.bound, c.mixture)
        h = cc.h(mu_f, sigma_f)
        cc.set_unit(float(sigma_f.detach()))
        coef = cc.coefficient(float(h.detach()))
        if coef <= 0.0:
            return None, 0.0
        h_norm = _norm(torch.autograd.grad(h, mus))
    scale = _ce_grad_norm(s.model, batches, base) / max(h_norm, 1e-30)
    weight = coef * (scale if c.balance == "ce_norm" else 1.0)
    bound, mixture = c.bound, c.mixture

    def penalty(w: dict[str, Tensor]) -> Tensor:
        logs = ArchSample(*(torch.log(w[k].clamp_min(1e-30)) for k in _KEYS))
        return weight * log_bound(logs, inputs, bound, mixture, log_weights=True)

    return penalty, weight


def _norm(gs) -> float:
    return float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in gs)))


def _ce_grad_norm(model: Any, batches: list[tuple[Tensor, Tensor]], base: ArchSample) -> float:
    """``||dCE/dz||`` at the logits ``base`` over ``batches`` (batch statistics, the running ones
    untouched): the CE's pull on the means as the architecture step measures it."""
    z = ArchSample(*(t.detach().clone().requires_grad_(True) for t in base.as_tuple()))
    n = sum(len(y) for _, y in batches)
    with frozen_statistics(model), torch.enable_grad():
        for x, y in batches:
            ce = F.cross_entropy(model(x, z).float(), y, reduction="sum")
            (ce / n).backward()
    return _norm([t.grad for t in z.as_tuple()])


def decode_search(s: Any, val: Any) -> Selection:
    """Decode a finished :class:`~rarn.nas.search.RACLSearch` by every magnitude rule, by
    ``perturbation`` and by the configured rule (D_V = ``val``), with the collapse reports and
    the configured remedy."""
    cfg = s.cfg
    limits, log_lam = CollapseLimits.of(cfg), cell_log_lipschitz(s.model)
    genotypes = {mode: s.decode(mode) for mode in MAGNITUDE_DECODERS}
    importance: dict[str, Importance] = {}
    for mode in dict.fromkeys(("perturbation", cfg.decode)):
        if mode not in PERTURBATION_DECODERS:
            continue
        batches = selection_batches(s, val)
        attack = robust_attack(s) if mode == "perturbation_robust" else None
        gen = torch.Generator().manual_seed(cfg.seed + 5)
        base = base_logits(s)
        penalty = None
        if cfg.decode_objective == "lagrangian":
            penalty, _ = lagrangian_penalty(s, batches, base)
        genotypes[mode], importance[mode] = perturbation_select(
            s.model,
            batches,
            base,
            estimate=cfg.decode_estimate,
            progressive=cfg.decode_progressive,
            generator=gen,
            attack=attack,
            penalty=penalty,
        )
    reports = {m: detect_collapse(g, log_lam, limits) for m, g in genotypes.items()}
    rule = cfg.decode
    if cfg.decode_max_param_free >= 0 and reports[rule].collapsed:
        scores = _op_scores(s, rule, importance.get(rule))
        capped = cap_parameter_free(genotypes[rule], scores, cfg.decode_max_param_free)
        if capped != genotypes[rule]:
            log.warning(
                "decoding %r collapsed (%s): at most %d parameter-free edges per cell (P-DARTS)",
                rule,
                reports[rule].reason,
                cfg.decode_max_param_free,
            )
            uncapped = f"{rule}_uncapped"
            genotypes[uncapped], reports[uncapped] = genotypes[rule], reports[rule]
            genotypes[rule], reports[rule] = capped, detect_collapse(capped, log_lam, limits)
    return Selection(rule, genotypes[rule], genotypes, reports, importance)


def _op_scores(s: Any, rule: str, imp: Importance | None) -> dict[str, Tensor]:
    if imp is not None:
        return {c: torch.nan_to_num(t, nan=float("-inf")) for c, t in imp.ops.items()}
    q = quantile_logits(s.model, s.ccfg.eta) if rule == "quantile" else s.model.arch.mu()
    return {"normal": q.normal.detach(), "reduce": q.reduce.detach()}
