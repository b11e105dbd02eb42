"""The end of a search: every decoding of the supernet, its collapse report, and the remedy.

* Magnitude rules (:mod:`rarn.nas.decode`: ``quantile``, ``median``, ``sample``) read the
  distributions; perturbation rules (:mod:`rarn.nas.perturbation`: ``perturbation``,
  ``perturbation_robust``) ask the supernet what each op is worth on D_V. Every search decodes by
  all magnitude rules and by ``perturbation`` (plus the configured rule), and reports each
  genotype's collapse signals, so the rules can be compared on every run.
* ``search.decode_objective``: ``ce`` measures an op by the validation CE alone (darts-pt);
  ``lagrangian`` by the objective the architecture step descends, the CE plus the chance
  constraint's bound at the search's final multiplier and balance (:func:`constraint_term`),
  so the constraint reaches the genotype through the selection as it reached the means. [ours]
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
from torch import Tensor

from rarn.nas.collapse import CollapseLimits, CollapseReport, cell_log_lipschitz, detect_collapse
from rarn.nas.constraint import log_bound
from rarn.nas.decode import (
    MAGNITUDE_DECODERS,
    PERTURBATION_DECODERS,
    cap_parameter_free,
    quantile_logits,
)
from rarn.nas.perturbation import Attack, Importance, Term, perturbation_select
from rarn.nas.supernet import ArchSample
from rarn.space.genotype import Genotype, edge_endpoints
from rarn.space.ops import PRIMITIVES

__all__ = [
    "Selection",
    "base_logits",
    "decode_search",
    "genotype_log_bound",
    "constraint_term",
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


def constraint_term(s: Any) -> Term | None:
    """The chance constraint as a selection criterion: the bound ``f(w)`` of the supernet with
    the mixing weights ``w`` (:func:`rarn.nas.constraint.log_bound`, ``log_weights``), with the
    multiplier the architecture step's Lagrangian gives it at the end of the search,
    ``c = y + rho max(0, h / unit)``, and the search's balance (``ce_norm``: each decision weighs
    the bound's rises ``c`` times as much as the CE's, :class:`~rarn.nas.perturbation.Term`).
    The chance part ``Phi^{-1}(eta) sigma_F`` of ``h`` is a constant of a removal (a selected
    architecture is deterministic) and drops out.

    ``None`` when the constraint is off or idle at the end (``c = 0``): the CE alone decides.
    """
    c, cc = s.ccfg, s.constraint
    if not c.enabled:
        return None
    inputs = s.bound_inputs(update=False)
    with torch.enable_grad():  # the delta method differentiates the bound
        mu_f, sigma_f = (t.detach() for t in s.moments(inputs))
    cc.update_threshold(s.model.arch.mu(), inputs, c.bound, c.mixture)
    h = float(cc.h(mu_f, sigma_f))
    cc.set_unit(float(sigma_f))
    coef = cc.coefficient(h)
    if coef <= 0.0:
        return None
    bound, mixture = c.bound, c.mixture

    def value(w: dict[str, Tensor]) -> Tensor:
        logs = ArchSample(*(torch.log(w[k].clamp_min(0.0)) for k in _KEYS))
        return log_bound(logs, inputs, bound, mixture, log_weights=True)

    return Term(value, coef, c.balance)


def genotype_log_bound(s: Any, genotype: Genotype) -> float:
    """The search's bound (``constraint.bound``, all ops) of the discrete architecture
    ``genotype`` under the supernet's current per-op constants: each kept edge carries its op
    alone, each node sums its two kept edges (as the discrete cell does), the dropped edges and
    ops weigh nothing. It reads how far a decoding went where the constraint pushes, in the
    constraint's own units (nats)."""
    E, n_ops = s.model.arch.mu().normal.shape
    index = {end: e for e, end in enumerate(edge_endpoints(genotype.nodes))}
    logs: dict[str, Tensor] = {}
    for cell in ("normal", "reduce"):
        ops = torch.full((E, n_ops), float("-inf"))
        edges = torch.full((E,), float("-inf"))
        for k, (op, i) in enumerate(getattr(genotype, cell)):
            e = index[(i, k // 2 + 2)]
            ops[e, PRIMITIVES.index(op)], edges[e] = 0.0, 0.0
        logs[cell], logs[f"{cell}_edges"] = ops, edges
    inputs = s.bound_inputs(update=False)
    z = ArchSample(*(logs[k].to(inputs.log_lam.device) for k in _KEYS))
    with torch.no_grad():
        return float(log_bound(z, inputs, s.ccfg.bound, "all", log_weights=True))


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
        term = constraint_term(s) if cfg.decode_objective == "lagrangian" else None
        genotypes[mode], importance[mode] = perturbation_select(
            s.model,
            batches,
            base,
            estimate=cfg.decode_estimate,
            progressive=cfg.decode_progressive,
            generator=gen,
            attack=attack,
            term=term,
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
