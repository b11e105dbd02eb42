"""Selection by perturbation: an op's importance is what the supernet loses without it.

Wang et al. (ICLR 2021, "Rethinking Architecture Selection in Differentiable NAS",
arXiv:2108.04392, code ``ruocwang/darts-pt``) show that the magnitude of ``alpha`` records early
biases (parameter-free ops win the argmax while the convolutions still learn) and need not say
which op the supernet relies on. They select each edge's op by the drop in the supernet's
validation accuracy when that op is removed, progressively: project one edge onto its chosen op,
then the next; then the topology, per node the two edges whose removal hurts most.

Here, with our choices marked (docs/method.md, "Decoding"):

* The criterion is the rise of the validation **loss** (CE) on fixed D_V images, paired (the same
  images for every candidate), not the accuracy: on a few hundred images the loss resolves
  differences the accuracy rounds away. [ours]
* The supernet is evaluated as the architecture step sees it: batch statistics (train mode),
  with every batch-norm running statistic restored afterwards (nothing the search keeps moves).
* The base architecture is the eta-lower quantile ``mu - Phi^{-1}(eta) sigma`` of the logits
  (spec §2.8), so the confidence enters the decision: of two ops with equal mean the less certain
  one weighs less in the supernet and removing it costs less. [ours]
* ``attack``: the robust loss, on the attack's examples made anew against every candidate
  supernet (``perturbation_robust``: PGD at the retraining's radius, ``search.robust_eval_*``).
  A fixed set made against the unperturbed supernet rewards removing whatever it exploits
  (measured: tests/test_perturbation.py). [ours; no public robust-NAS code selects ops by their
  robust importance]
* ``term``: a second criterion beside the loss, a function of the mixing weights (the chance
  constraint's bound, :func:`rarn.nas.selection.constraint_term`). Each decision (an edge's op,
  a cell type's edges) ranks ``loss rise + c * scale * term rise``, where the term's rises are
  exact (the bound is analytic), ``c`` is the term's multiplier (the search's final dual) and
  ``scale`` (``ce_norm``) the ratio of the spreads of the two rises over the candidates: the
  term pulls ``c`` times as hard as the loss on every decision, as the architecture step's
  balance makes the constraint pull ``c`` times as hard as the CE on the means. [ours]
* Removing an op zeroes its mixing weight without renormalising the others (darts-pt);
  removing an edge zeroes its PC-DARTS ``beta`` (its bypass channels go with it).
* The loss rise is measured ``exact`` (one supernet loss per removal, 226 for the DARTS space:
  darts-pt's measure; a decision's candidates in grouped passes,
  :meth:`rarn.nas.supernet.Supernet.grouped_forward`) or to ``first_order``, ``-w dL/dw`` for every
  op and edge from one backward pass (the Taylor importance of pruning, Molchanov et al. 2019,
  arXiv:1906.10771). ``exact`` is the default: on a supernet in which only sep_conv_3x3 carries
  any signal (tests/test_perturbation.py), ``first_order`` picked max_pool on 2 of 4 normal
  edges, because batch normalisation after the nodes makes the loss locally blind to the scale
  of ``w`` (removing an op is not a small change). [ours]
* ``progressive``: project one edge onto its chosen op, rescore, repeat, in a seeded random
  order (darts-pt); ``tune`` (optional) is called after each projection with the projected
  logits, for weight steps between projections as darts-pt does. One shot (default): every op
  scored on the base supernet, the topology on the op-projected one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.config.schema import PerturbationEstimate
from rarn.nas.supernet import ArchSample, node_softmax
from rarn.nas.supernet_loss import (
    Attack,
    Batch,
    FixedWeights,
    attacked,
    frozen_statistics,
    supernet_loss,
    supernet_losses,
)
from rarn.space.genotype import Genotype
from rarn.space.ops import PRIMITIVES

__all__ = [
    "ESTIMATES",
    "Attack",
    "FixedWeights",
    "Importance",
    "Term",
    "perturbation_select",
    "supernet_loss",
]

_CELLS = ("normal", "reduce")
_NONE = PRIMITIVES.index("none")
_KEYS = ("normal", "reduce", "normal_edges", "reduce_edges")
_IMAGES_PER_PASS = 512  # grouped ablations: copies of the selection batch per supernet pass
ESTIMATES: tuple[str, ...] = get_args(PerturbationEstimate)


@dataclass(frozen=True)
class Importance:
    """Loss rises of one perturbation selection.

    Attributes:
        ops: per cell type ``[E, n_ops]``, the rise when the op is removed from its edge at the
            moment that edge was projected (``nan`` for ``none``, never a candidate).
        edges: per cell type ``[E]``, the rise when the edge is removed from the op-projected
            supernet.
        base_loss: the loss of the base (unprojected) supernet.
        evaluations: supernet losses measured over the selection images (the cost; a grouped
            pass measures several at once), a backward counted as one more.
    """

    ops: dict[str, Tensor]
    edges: dict[str, Tensor]
    base_loss: float
    evaluations: int


@dataclass(frozen=True)
class Term:
    """A second selection criterion: ``value(w)``, a scalar function of the mixing weights ``w``
    (``normal``, ``reduce`` ``[E, n_ops]``; ``normal_edges``, ``reduce_edges`` ``[E]``), with
    its multiplier ``coef`` and ``balance``: ``ce_norm`` scales its rises to the loss rises'
    spread on each decision (``coef = 1``: both pull alike), ``none`` adds ``coef`` times them
    as they are (in the loss's units)."""

    value: Callable[[dict[str, Tensor]], Tensor]
    coef: float
    balance: str = "ce_norm"

    def rises(self, w: dict[str, Tensor], key: str, index: list[tuple[int, ...]]) -> Tensor:
        """The term's rise when ``w[key][i]`` is set to 0, for every ``i`` in ``index``."""
        with torch.no_grad():
            ref = float(self.value(w))
            out = []
            for i in index:
                t = w[key].clone()
                t[i] = 0.0
                out.append(float(self.value({**w, key: t})) - ref)
        return torch.tensor(out, dtype=torch.float64)

    def combine(self, loss_rises: Tensor, term_rises: Tensor) -> Tensor:
        """``loss + coef * scale * term`` over one decision's candidates (finite entries)."""
        ok = torch.isfinite(loss_rises)
        scale = 1.0
        if self.balance == "ce_norm":
            a, b = loss_rises[ok], term_rises[ok]
            spread = float((b - b.mean()).norm()) if len(b) > 1 else 0.0
            scale = float((a - a.mean()).norm()) / spread if spread > 0 else 0.0
        out = loss_rises.clone()
        out[ok] += self.coef * scale * term_rises[ok]
        return out


def _edge_slices(nodes: int) -> list[tuple[int, int]]:
    out, start = [], 0
    for j in range(nodes):
        out.append((start, start + j + 2))
        start += j + 2
    return out


class _Scorer:
    """Loss rises of removals from the mixing weights ``w``: ``exact`` (one pass per removal) or
    ``first_order`` (``-w dL/dw`` for every op and edge from one backward pass, Molchanov et
    al. 2019's Taylor importance, arXiv:1906.10771), both with batch statistics and the running
    statistics untouched. ``grouped``: the exact losses of a decision's candidates (an edge's
    ops, a cell type's edges) from grouped passes (:func:`supernet_losses`, up to
    ``_IMAGES_PER_PASS`` images each), where the supernet has them and no attack is made per
    candidate; every loss of the selection then comes from that arithmetic, the references
    included."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        estimate: str,
        attack: Attack | None,
        grouped: bool = True,
    ) -> None:
        if estimate not in ESTIMATES:
            raise ValueError(f"unknown estimate {estimate!r}; known: {', '.join(ESTIMATES)}")
        self.model, self.batches, self.exact = model, batches, estimate == "exact"
        self.attack = attack
        self.grouped = (
            grouped
            and self.exact
            and attack is None
            and bool(getattr(model, "fused", False))
            and hasattr(model, "grouped_forward")
        )
        self.evaluations = 0  # losses measured (a backward counts as one more)
        self._grads: dict[str, Tensor] | None = None

    def weights(self, w: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return tuple(w[k] for k in _KEYS)

    def loss(self, w: dict[str, Tensor]) -> float:
        return self.losses([w])[0]

    def losses(self, ws: list[dict[str, Tensor]]) -> list[float]:
        """The loss under each mixing weights of ``ws``."""
        self.evaluations += len(ws)
        if not self.grouped:
            m, b, a = self.model, self.batches, self.attack
            return [supernet_loss(m, b, self.weights(w), a) for w in ws]
        per = max(1, _IMAGES_PER_PASS // max(len(y) for _, y in self.batches))
        out: list[float] = []
        for i in range(0, len(ws), per):
            chunk = ws[i : i + per]
            out += supernet_losses(
                self.model, self.batches, tuple(torch.stack([w[k] for w in chunk]) for k in _KEYS)
            )
        return out

    def changed(self) -> None:
        self._grads = None

    def grads(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._grads is None:
            leaves = {k: w[k].detach().clone().requires_grad_(True) for k in _KEYS}
            n = sum(len(y) for _, y in self.batches)
            with frozen_statistics(self.model):  # Danskin: the loss at the attack's point
                for x, y in self.batches:
                    x = attacked(self.model, x, y, self.weights(w), self.attack)
                    with torch.enable_grad():
                        logits = self.model(x, weights=self.weights(leaves))
                        (F.cross_entropy(logits.float(), y, reduction="sum") / n).backward()
            self.evaluations += 2
            self._grads = {k: v.grad.detach().double() for k, v in leaves.items()}
        return self._grads

    def op_rises(self, w: dict[str, Tensor], cell: str, e: int, ref: float) -> Tensor:
        if not self.exact:
            return -(self.grads(w)[cell][e] * w[cell][e].double())
        out = torch.zeros(w[cell].shape[1], dtype=torch.float64)
        ops = [o for o in range(len(out)) if o != _NONE]
        cands = []
        for o in ops:
            t = w[cell].clone()
            t[e, o] = 0.0
            cands.append({**w, cell: t})
        out[ops] = torch.tensor(self.losses(cands), dtype=torch.float64) - ref
        return out

    def edge_rises(self, w: dict[str, Tensor], cell: str, ref: float) -> Tensor:
        name = f"{cell}_edges"
        if not self.exact:
            return -(self.grads(w)[name] * w[name].double())
        cands = []
        for e in range(len(w[name])):
            t = w[name].clone()
            t[e] = 0.0
            cands.append({**w, name: t})
        return torch.tensor(self.losses(cands), dtype=torch.float64) - ref


def perturbation_select(
    model: nn.Module,
    batches: Sequence[Batch],
    base: ArchSample,
    *,
    estimate: str = "first_order",
    progressive: bool = False,
    generator: torch.Generator | None = None,
    tune: Callable[[ArchSample], None] | None = None,
    attack: Attack | None = None,
    term: Term | None = None,
    grouped: bool = True,
) -> tuple[Genotype, Importance]:
    """Selection by perturbation (darts-pt) from the base logits ``base``.

    Args:
        model: a supernet whose forward accepts ``weights=`` (op weights per cell type
            ``[E, n_ops]``, edge weights ``[E]``) and whose ``arch.nodes`` is the node count.
        batches: fixed ``(x, y)`` batches (D_V images, or their adversarial examples).
        base: architecture logits the supernet starts from (e.g. the eta-lower quantile).
        estimate: ``exact`` (one supernet pass per removed op or edge: darts-pt's measure,
            about 250 passes for the DARTS space) or ``first_order`` (``-w dL/dw`` from one
            backward pass per projection).
        progressive: project each edge onto its chosen op before scoring the next (darts-pt);
            ``False``: every op scored on the base supernet (one shot), the topology on the
            op-projected one.
        generator: the order in which the edges are projected (default: natural order).
        tune: called with the projected logits after each op projection (weight steps).
        attack: the robust loss: every loss is measured on this attack's examples against the
            supernet being measured (each candidate attacked anew: a fixed set of examples,
            made against the unperturbed supernet, rewards removing whatever they exploit).
        term: a second criterion (e.g. the chance constraint's bound,
            :func:`rarn.nas.selection.constraint_term`): every decision ranks the loss rise plus
            the term's balanced rise (:class:`Term`); ``Importance`` then holds the combined
            rises.
        grouped: measure the ``exact`` losses of a decision's candidates in grouped passes
            (:meth:`rarn.nas.supernet.Supernet.grouped_forward`; the same losses up to float
            rounding, several times fewer passes) where the supernet has them and no ``attack``
            is made per candidate; ``False``: one pass per loss.

    Returns:
        The genotype (per node the two edges whose removal raises the loss most, each with the
        op whose removal raised it most, never ``none``) and the importances.
    """
    # One save and restore of the running statistics for the whole selection; ``tune`` trains
    # the supernet between projections, and its statistics are kept.
    with frozen_statistics(model) if tune is None else nullcontext():
        score = _Scorer(model, batches, estimate, attack, grouped)
        return _select(score, base, progressive, generator, tune, term)


def _select(
    score: _Scorer,
    base: ArchSample,
    progressive: bool,
    generator: torch.Generator | None,
    tune: Callable[[ArchSample], None] | None,
    term: Term | None,
) -> tuple[Genotype, Importance]:
    nodes = score.model.arch.nodes
    with torch.no_grad():
        w = {
            "normal": torch.softmax(base.normal, -1).clone(),
            "reduce": torch.softmax(base.reduce, -1).clone(),
            "normal_edges": node_softmax(base.normal_edges, nodes).clone(),
            "reduce_edges": node_softmax(base.reduce_edges, nodes).clone(),
        }
    base_loss = score.loss(w)
    E, n_ops = w["normal"].shape
    op_imp = {c: torch.full((E, n_ops), float("nan"), dtype=torch.float64) for c in _CELLS}
    order = [(c, e) for c in _CELLS for e in range(E)]
    if generator is not None:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    ref = base_loss  # the loss of the supernet as projected so far (exact estimate)
    chosen = {}
    for cell, e in order:
        rises = score.op_rises(w, cell, e, ref)
        rises[_NONE] = float("nan")
        if term is not None:
            rises = term.combine(rises, term.rises(w, cell, [(e, o) for o in range(n_ops)]))
        op_imp[cell][e] = rises
        chosen[cell, e] = int(torch.nan_to_num(rises, nan=float("-inf")).argmax())
        if progressive:
            _project(w, cell, e, chosen[cell, e])
            score.changed()
            if tune is not None:
                tune(_projected_logits(w))
            ref = score.loss(w) if score.exact else ref
    if not progressive:  # the topology is chosen on the op-projected supernet
        for (cell, e), best in chosen.items():
            _project(w, cell, e, best)
        score.changed()
        ref = score.loss(w) if score.exact else ref
    edge_imp = _edge_importance(score, w, ref, nodes, term)
    genotype = _genotype(op_imp, edge_imp, nodes)
    return genotype, Importance(op_imp, edge_imp, base_loss, score.evaluations)


def _edge_importance(
    score: _Scorer, w: dict[str, Tensor], ref: float, nodes: int, term: Term | None
) -> dict[str, Tensor]:
    """Per cell type the rise when each edge is removed from the op-projected supernet, with
    the term's rise balanced in per node (each node keeps two of its incoming edges)."""
    edge_imp = {c: score.edge_rises(w, c, ref) for c in _CELLS}
    if term is not None:
        for c in _CELLS:
            for lo, hi in _edge_slices(nodes):
                t = term.rises(w, f"{c}_edges", [(i,) for i in range(lo, hi)])
                edge_imp[c][lo:hi] = term.combine(edge_imp[c][lo:hi], t)
    return edge_imp


def _project(w: dict[str, Tensor], cell: str, e: int, op: int) -> None:
    w[cell][e] = 0.0
    w[cell][e, op] = 1.0


def _projected_logits(w: dict[str, Tensor]) -> ArchSample:
    """Logits whose softmax gives back ``w`` (a zero weight is ``-inf``); edge logits are
    the log of the node-normalised weights, which the per-node softmax returns unchanged."""
    return ArchSample(*(torch.log(w[k].clamp_min(0.0)) for k in _KEYS))


def _genotype(op_imp: dict[str, Tensor], edge_imp: dict[str, Tensor], nodes: int) -> Genotype:
    cells = {}
    for cell in _CELLS:
        scores = torch.nan_to_num(op_imp[cell], nan=float("-inf"))
        scores[:, _NONE] = float("-inf")
        best = scores.argmax(1)
        pairs: list[tuple[str, int]] = []
        for lo, hi in _edge_slices(nodes):
            s = edge_imp[cell][lo:hi]
            top = sorted(range(hi - lo), key=lambda i: (-float(s[i]), i))[:2]
            pairs += [(PRIMITIVES[int(best[lo + i])], i) for i in sorted(top)]
        cells[cell] = pairs
    concat = tuple(range(2, nodes + 2))
    return Genotype(cells["normal"], concat, cells["reduce"], concat)
