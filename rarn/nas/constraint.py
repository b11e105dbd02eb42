"""The log-normal Lipschitz bound and the chance constraint of RACL (spec §2.3-2.6, Eq. 7-19).

The supernet's log-bound, as a function of the architecture logits ``z`` (op logits per cell
type ``[E, n_ops]``, edge logits ``[E]``) and the per-op log-constants ``log lambda[cell, E, op]``::

    ln lambda_F(z) <= ln C + sum_cells sum_nodes ln sum_{i<j} beta_ij(z) Lambda_ij(z)
    Lambda_ij = max(1, sum_o w_ij,o(z) lambda_ij,o)     (the PC-DARTS bypass, K > 1)

with ``w = softmax_o(z)`` over all ops (``mixture="all"``; other mixtures renormalise over a
subset and are documented variants) and ``beta`` the per-node softmax of the edge logits; the
cells' preprocessing and concatenation add constants (:func:`log_bound` says which). Every
factor is a true upper bound of the module as built (tests/test_bound_corners.py).
``z ~ N(mu, sigma^2)`` makes ``lambda_F`` a random variable; it is approximated by a univariate
log-normal ``LN(mu_F, sigma_F^2)`` by

* ``delta`` (default): first-order delta method on the whole log-bound,
  ``mu_F = f(mu)``, ``sigma_F^2 = sum_i (df/dz_i)^2 sigma_i^2``. It accounts for the negative
  correlation of softmax weights and for ``alpha``/``beta`` being shared by all cells of a type,
  which per-node Fenton-Wilkinson ignores (spec §12 measured FW biased by about +1.2 nats);
* ``monte_carlo``: mean and std of ``f(z)`` over reparameterised samples (unbiased, noisy).

The chance constraint ``P(lambda_F <= lambda_bar) >= eta`` in CDF form (Eq. 13-15) is
``h = mu_F + Phi^{-1}(eta) sigma_F - ln lambda_bar <= 0``, enforced by an augmented Lagrangian
``y h + rho/2 max(0, h)^2`` with dual ascent ``y <- max(0, y + rho h)``.

``bound="node_mean"`` constrains the mean node factor instead (the geometric-mean per-node gain);
docs/constraint.md says how it differs from the product beyond its scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.stats import norm
from torch import Tensor

from rarn.config import ConstraintConfig
from rarn.nas.balance import BALANCES
from rarn.nas.supernet import ArchDistribution, ArchSample, node_log_softmax
from rarn.space.ops import PARAMETRIC, PRIMITIVES

__all__ = [
    "BOUNDS",
    "MIXTURES",
    "ESTIMATORS",
    "THRESHOLDS",
    "ThresholdRule",
    "BoundInputs",
    "ChanceConstraint",
    "cell_log_bounds",
    "edge_log_bounds",
    "node_log_factors",
    "delta_moments",
    "log_bound",
    "monte_carlo_moments",
    "satisfaction_probability",
]

# The constraint's choices are registries, one entry each: MIXTURES here, BOUNDS, ESTIMATORS and
# THRESHOLDS above ChanceConstraint, BALANCES in rarn.nas.balance; rarn.nas.choices checks a
# config's names against them. A new choice is one entry in its table plus its test.
MIXTURES: dict[str, tuple[str, ...]] = {  # the ops left out of the bound's mixture
    "all": (),
    "no_none": ("none",),
    "parametric": tuple(p for p in PRIMITIVES if p not in PARAMETRIC),
}


@dataclass(frozen=True)
class BoundInputs:
    """Detached per-op constants of the current weights.

    Attributes:
        log_lam: ``[n_cells, E, n_ops]`` log-Lipschitz bound of every op (``-inf`` for none).
        is_reduce: ``[n_cells]`` bool, which cells are reduction cells.
        log_c: log-constant of the arch-independent layers outside the cells (stem, classifier;
            also the preprocessing when ``log_pre`` is not given).
        nodes: intermediate nodes per cell (all of them are concatenated into the output).
        log_pre: ``[n_cells]`` per cell the larger log-constant of its two preprocessing layers
            (``None``: included in ``log_c``).
        partial_channels: PC-DARTS ``K``; ``K > 1`` means the bypass of ``(K - 1) / K`` channels.
    """

    log_lam: Tensor
    is_reduce: Tensor
    log_c: float
    nodes: int
    log_pre: Tensor | None = None
    partial_channels: int = 1


def edge_log_bounds(
    z: ArchSample, inputs: BoundInputs, mixture: str = "all", log_weights: bool = False
) -> Tensor:
    """Log-bound of every mixed op (edge before ``beta``), ``[..., cells, E]``.

    The mixed part ``sum_o w_o o(x_a)`` is bounded by ``sum_o w_o lambda_o``. With partial
    channels (``K > 1``) the edge is ``P [sum_o w_o o(x_a); B(x_b)]``: ``x_a`` (the first ``C/K``
    channels) and ``x_b`` (the other ``(K - 1) C / K``) are disjoint parts of ``x``, ``P`` (the
    channel shuffle) is a permutation, and ``B`` is the identity, or a 2 x 2 stride-2 max pool
    with disjoint windows at stride 2, so ``Lip(B) <= 1``. For a block-diagonal map
    ``||[f(a) - f(a'); g(b) - g(b')]||^2 <= Lf^2 ||a - a'||^2 + Lg^2 ||b - b'||^2
    <= max(Lf, Lg)^2 ||x - x'||^2``, hence the edge bound ``max(1, sum_o w_o lambda_o)``. It is
    tight (an edge whose weight is all on ``none`` passes ``x_b`` unchanged: norm 1), and it is
    what keeps ``none`` from looking like a free way to lower the bound: below 1 it buys nothing.

    ``log_weights``: ``z`` holds the log mixing weights themselves (used as they are, e.g. with
    an op removed and the others not renormalised, as the perturbation selection evaluates the
    supernet; a masked mixture still renormalises over its ops).
    """
    sel = inputs.is_reduce.to(z.normal.device)
    ops = torch.where(sel[:, None, None], z.reduce.unsqueeze(-3), z.normal.unsqueeze(-3))
    if mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; known: {', '.join(MIXTURES)}")
    if MIXTURES[mixture]:  # renormalise the op weights over the ops in the mixture
        mask = torch.zeros(ops.shape[-1], dtype=torch.bool, device=ops.device)
        mask[[PRIMITIVES.index(p) for p in MIXTURES[mixture]]] = True
        ops = ops.masked_fill(mask, float("-inf"))
    log_w = ops if log_weights and not MIXTURES[mixture] else torch.log_softmax(ops, dim=-1)
    # -inf + -inf stays -inf; logsumexp ignores it (the `none` op contributes nothing).
    edge = torch.logsumexp(log_w + inputs.log_lam.to(log_w), dim=-1)  # [..., cells, E]
    return torch.relu(edge) if inputs.partial_channels > 1 else edge


def node_log_factors(
    z: ArchSample, inputs: BoundInputs, mixture: str = "all", log_weights: bool = False
) -> Tensor:
    """Per node ``ln max(1, a_j)``, ``a_j = sum_{i<j} beta_ij edge_ij``: ``[..., cells, nodes]``.

    Node ``j`` is ``sum_i beta_ij e_ij(I_i)``, so ``Lip(I_j) <= a_j max_{i<j} Lip(I_i)`` and, by
    induction, every node (and each cell input) is within ``prod_k max(1, a_k)`` of the larger
    cell input: the spec's product over nodes (Eq. 10). With the bypass every ``a_j >= 1``
    (``beta`` sums to 1 and every edge is ``>= 1``) and the ``max`` never binds.
    """
    sel = inputs.is_reduce.to(z.normal.device)
    edges = torch.where(sel[:, None], z.reduce_edges.unsqueeze(-2), z.normal_edges.unsqueeze(-2))
    beta = edges if log_weights else node_log_softmax(edges, inputs.nodes)
    total = beta + edge_log_bounds(z, inputs, mixture, log_weights)
    per_node, start = [], 0
    for j in range(inputs.nodes):
        per_node.append(torch.logsumexp(total[..., start : start + j + 2], dim=-1))
        start += j + 2
    return torch.relu(torch.stack(per_node, dim=-1))


def cell_log_bounds(
    z: ArchSample, inputs: BoundInputs, mixture: str = "all", log_weights: bool = False
) -> Tensor:
    """Log-bound of every cell's map ``(s0, s1) -> output``, ``[..., cells]``.

    The larger preprocessing constant bounds both cell inputs, the node product every node, and
    the output concatenates ``nodes`` of them: ``||[f_1; ...; f_n]|| <= sqrt(n) max_k Lip(f_k)``.
    """
    pre = 0.0 if inputs.log_pre is None else inputs.log_pre.to(z.normal)
    concat = 0.5 * math.log(inputs.nodes)
    return node_log_factors(z, inputs, mixture, log_weights).sum(dim=-1) + concat + pre


def log_bound(
    z: ArchSample,
    inputs: BoundInputs,
    bound: str = "product",
    mixture: str = "all",
    log_weights: bool = False,
) -> Tensor:
    """The log-bound ``f(z)``; ``z`` tensors may carry a leading sample dim (returns ``[S]``).

    ``product``: an upper bound of the supernet's ``ln lambda_F``. Cell ``k`` reads the outputs of
    cells ``k - 2`` and ``k - 1``, so the larger of the two running constants grows by at most
    ``max(1, cell bound)`` per cell: ``ln C + sum_k max(0, ln cell_k)``. ``node_mean``: the mean
    of the node factors, the architecture-dependent part of the product per node.
    ``log_weights``: ``z`` holds log mixing weights, used without renormalising
    (:func:`edge_log_bounds`).
    """
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; known: {', '.join(BOUNDS)}")
    return BOUNDS[bound](z, inputs, mixture, log_weights)


def delta_moments(
    mu: ArchSample, sigma: ArchSample, inputs: BoundInputs, bound: str, mixture: str
) -> tuple[Tensor, Tensor]:
    """``(mu_F, sigma_F)`` by the first-order delta method, differentiable in mu and sigma."""
    mus = mu.as_tuple()
    if not all(t.requires_grad for t in mus):
        mus = tuple(t.detach().requires_grad_(True) for t in mus)
    f = log_bound(ArchSample(*mus), inputs, bound, mixture)
    grads = torch.autograd.grad(f, mus, create_graph=torch.is_grad_enabled())
    var = sum(((g * s) ** 2).sum() for g, s in zip(grads, sigma.as_tuple()))
    return f, var.clamp_min(1e-24).sqrt()


def monte_carlo_moments(
    samples: ArchSample, inputs: BoundInputs, bound: str, mixture: str
) -> tuple[Tensor, Tensor]:
    """``(mu_F, sigma_F)`` as mean and std of ``f(z)`` over samples with a leading dim."""
    f = log_bound(samples, inputs, bound, mixture)
    return f.mean(), f.std(unbiased=True) if f.numel() > 1 else f.new_zeros(())


def satisfaction_probability(mu_f: float, sigma_f: float, log_lambda_bar: float) -> float:
    """``P(lambda_F <= lambda_bar) = Phi((ln lambda_bar - mu_F) / sigma_F)``."""
    return float(norm.cdf((log_lambda_bar - mu_f) / max(sigma_f, 1e-12)))


def _product(z: ArchSample, inputs: BoundInputs, mixture: str, log_weights: bool = False) -> Tensor:
    return torch.relu(cell_log_bounds(z, inputs, mixture, log_weights)).sum(dim=-1) + inputs.log_c


def _node_mean(
    z: ArchSample, inputs: BoundInputs, mixture: str, log_weights: bool = False
) -> Tensor:
    return node_log_factors(z, inputs, mixture, log_weights).mean(dim=(-1, -2))


BOUNDS: dict[str, Callable[..., Tensor]] = {"product": _product, "node_mean": _node_mean}
"""Bound -> ``f(z, inputs, mixture, log_weights=False)``, the log-bound :func:`log_bound`
constrains."""


def _delta(arch: ArchDistribution, inputs: BoundInputs, bound: str, mixture: str,
           generator: torch.Generator, samples: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    return delta_moments(arch.mu(), arch.sigma(), inputs, bound, mixture)


def _monte_carlo(arch: ArchDistribution, inputs: BoundInputs, bound: str, mixture: str,
                 generator: torch.Generator, samples: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    return monte_carlo_moments(arch.sample(generator, n=samples), inputs, bound, mixture)


Moments = Callable[
    [ArchDistribution, BoundInputs, str, str, torch.Generator, int], tuple[Tensor, Tensor]
]
ESTIMATORS: dict[str, Moments] = {"delta": _delta, "monte_carlo": _monte_carlo}
"""Estimator -> ``(arch, inputs, bound, mixture, generator, samples) -> (mu_F, sigma_F)`` under
the architecture distribution (``samples`` draws from ``generator`` where it samples)."""


@dataclass(frozen=True)
class ThresholdRule:
    """How ``ln lambda_bar`` is set.

    Attributes:
        level: ``(f_ref, kappa) -> ln lambda_bar`` from the reference architecture's bound;
            ``None``: the absolute ``log_lambda_bar``, set once.
        tracks: re-evaluate ``f_ref`` at every step under the current weights (else fixed at
            the first architecture step).
    """

    level: Callable[[float, float], float] | None
    tracks: bool = False


def _below_reference(ref: float, kappa: float) -> float:
    return ref - kappa * abs(ref)


THRESHOLDS: dict[str, ThresholdRule] = {
    "absolute": ThresholdRule(None),
    "relative": ThresholdRule(_below_reference),
    "tracking": ThresholdRule(_below_reference, tracks=True),
}


class ChanceConstraint:
    """Threshold, dual and augmented-Lagrangian term of ``P(lambda_F <= lambda_bar) >= eta``.

    Built from a ``constraint`` section by :meth:`from_config`; the defaults are
    :class:`~rarn.config.ConstraintConfig`'s (one set of defaults).

    Args:
        eta: confidence level.
        rho: augmented-Lagrangian penalty (also the dual step size).
        threshold: ``absolute`` (``ln lambda_bar = log_lambda_bar``), ``relative`` (fixed at the
            first architecture step: ``mu_F0 - kappa |mu_F0|``) or ``tracking`` (re-evaluated at
            every step from the bound of the reference architecture, the means at the first
            architecture step, under the current weights: ``f(mu_ref) - kappa |f(mu_ref)|``; it
            isolates the architecture's effect from weight growth).
        kappa: relative margin.
        log_lambda_bar: absolute threshold.
        dual_init: initial ``y``.
        relative: measure ``h`` in the dual step and the penalty in units of the current
            demand ``margin + Phi^{-1}(eta) sigma_F`` (``h`` at the reference means; see
            :meth:`set_unit`), so that ``rho`` is per unit of relative violation whatever the
            bound's scale; ``False``: in nats (the spec's form).
    """

    THRESHOLDS = THRESHOLDS

    def __init__(
        self,
        eta: float = ConstraintConfig.eta,
        rho: float = ConstraintConfig.rho,
        threshold: str = ConstraintConfig.threshold,
        kappa: float = ConstraintConfig.kappa,
        log_lambda_bar: float = ConstraintConfig.log_lambda_bar,
        dual_init: float = ConstraintConfig.dual_init,
        relative: bool = BALANCES[ConstraintConfig.balance].relative,
    ) -> None:
        if not 0.5 <= eta < 1.0:
            raise ValueError(f"eta must lie in [0.5, 1) (convex constraint), got {eta}")
        if threshold not in self.THRESHOLDS:
            raise ValueError(
                f"unknown threshold {threshold!r}; known: {', '.join(self.THRESHOLDS)}"
            )
        if rho <= 0 or dual_init < 0:
            raise ValueError(f"need rho > 0 and dual_init >= 0, got {rho}, {dual_init}")
        self.eta, self.rho, self.threshold, self.kappa = eta, rho, threshold, kappa
        self.z_eta = float(norm.ppf(eta))
        self.y = float(dual_init)
        self.relative, self.unit = relative, 1.0
        self.log_lambda_bar: float | None = None if self.rule.level else log_lambda_bar
        self.reference: ArchSample | None = None  # the means at the first architecture step
        self.ref_bound: float | None = None  # f(reference): now (tracking) or at the first step

    @property
    def rule(self) -> ThresholdRule:
        """The rule of :attr:`threshold` (looked up each time: ``threshold`` may be reassigned)."""
        return THRESHOLDS[self.threshold]

    @classmethod
    def from_config(cls, c: ConstraintConfig) -> ChanceConstraint:
        """The constraint of a ``constraint`` section (``relative`` from its balance's rule)."""
        return cls(
            c.eta, c.rho, c.threshold, c.kappa, c.log_lambda_bar, c.dual_init,
            relative=BALANCES[c.balance].relative,
        )  # fmt: skip

    def update_threshold(
        self, mu: ArchSample, inputs: BoundInputs, bound: str, mixture: str
    ) -> float:
        """Set (first call) or re-evaluate (tracking) ``ln lambda_bar``; returns it."""
        if self.reference is None:
            self.reference = ArchSample(*(t.detach().clone() for t in mu.as_tuple()))
        if self.rule.tracks or self.ref_bound is None:
            with torch.no_grad():
                self.ref_bound = float(log_bound(self.reference, inputs, bound, mixture))
        if self.rule.level:  # kappa may ramp (ConstraintConfig.kappa_ramp)
            self.log_lambda_bar = self.rule.level(self.ref_bound, self.kappa)
        return float(self.log_lambda_bar)

    @property
    def margin(self) -> float:
        """``f(mu_ref) - ln lambda_bar``: how far below the reference architecture's bound the
        threshold lies (``kappa |f(mu_ref)|`` unless absolute)."""
        if self.ref_bound is None or self.log_lambda_bar is None:
            raise RuntimeError("threshold not set: call update_threshold first")
        return self.ref_bound - self.log_lambda_bar

    def set_unit(self, sigma_f: float) -> float:
        """The unit of ``h`` for this step: 1, or (``relative``) the demand ``margin +
        Phi^{-1}(eta) sigma_F``, what the constraint asks of the reference means (a tracking
        threshold re-evaluates it with the weights)."""
        if self.relative:
            self.unit = max(max(self.margin, 0.0) + self.z_eta * sigma_f, 1e-6)
        return self.unit

    def coefficient(self, h: float) -> float:
        """``dL/d(h / unit) = y + rho max(0, h / unit)`` of the augmented Lagrangian."""
        return self.y + self.rho * max(0.0, h / self.unit)

    def h(self, mu_f: Tensor, sigma_f: Tensor) -> Tensor:
        """Constraint value ``mu_F + Phi^{-1}(eta) sigma_F - ln lambda_bar`` (<= 0 is satisfied)."""
        if self.log_lambda_bar is None:
            raise RuntimeError("threshold not set: call update_threshold first")
        return mu_f + self.z_eta * sigma_f - self.log_lambda_bar

    def penalty(self, h: Tensor) -> Tensor:
        """Augmented-Lagrangian term ``y h + rho/2 max(0, h)^2`` (``h`` in :attr:`unit` s)."""
        h = h / self.unit
        return self.y * h + 0.5 * self.rho * torch.relu(h) ** 2

    def dual_step(self, h: float) -> float:
        """``y <- max(0, y + rho h)`` (``h`` in :attr:`unit` s); returns the new ``y``."""
        self.y = max(0.0, self.y + self.rho * float(h) / self.unit)
        return self.y

    def state_dict(self) -> dict:
        ref = None if self.reference is None else [t.cpu() for t in self.reference.as_tuple()]
        return {
            "y": self.y,
            "log_lambda_bar": self.log_lambda_bar,
            "reference": ref,
            "ref_bound": self.ref_bound,
        }

    def load_state_dict(self, state: dict) -> None:
        self.y = float(state["y"])
        self.log_lambda_bar = state["log_lambda_bar"]
        self.ref_bound = state.get("ref_bound")  # absent in checkpoints before issue 12
        ref = state["reference"]
        self.reference = None if ref is None else ArchSample(*ref)
