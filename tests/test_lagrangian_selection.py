"""Selection on the search's objective (``search.decode_objective: lagrangian``): each decision
ranks the rise of the validation CE plus the chance constraint's bound, weighed by the search's
final multiplier and balance, so the constraint reaches the genotype through the selection."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_perturbation import DIL3, N_OPS, SEP3, SKIP, _Linear, _uniform

from rarn.config import ConstraintConfig, SearchConfig
from rarn.nas.constraint import log_bound
from rarn.nas.perturbation import Term, perturbation_select
from rarn.nas.search import RACLSearch
from rarn.nas.selection import base_logits, constraint_term, genotype_log_bound
from rarn.nas.supernet import ArchSample, node_log_softmax
from rarn.space.genotype import Genotype, edge_endpoints
from rarn.space.ops import PRIMITIVES

KEYS = ("normal", "reduce", "normal_edges", "reduce_edges")
TINY = SearchConfig(
    init_channels=4, layers=3, nodes=2, partial_channels=1, batch_size=8, epochs=1, seed=0
)


def _sep_term(coef: float, balance: str = "none") -> Term:
    """A term that charges 1 per unit of sep_conv_3x3 weight in the normal cell."""
    return Term(lambda w: w["normal"][:, SEP3].sum(), coef, balance)


@pytest.mark.parametrize("estimate", ["exact", "first_order"])
def test_term_enters_every_decision(estimate):
    """The hand case of test_perturbation: each edge's best op is sep_conv_3x3. With a term, an
    op's importance is its loss rise plus ``coef`` times the term's rise (``balance: none``),
    exactly; a term that outweighs the loss turns every normal edge away from sep_conv_3x3, and
    the reduction cell, which it does not charge, keeps its ops."""
    E, nodes = 5, 2
    c_n = torch.zeros(E, N_OPS)
    c_n[:, SEP3] = torch.tensor([2.0, 1.0, 0.2, 3.0, 1.5])
    c_n[:, SKIP] = 0.5
    c_r = torch.zeros(E, N_OPS)
    c_r[:, DIL3] = 1.0
    model = _Linear(c_n, c_r, nodes)
    batches = [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))]
    kw = {"estimate": estimate, "progressive": False}
    g0, imp0 = perturbation_select(model, batches, _uniform(E), **kw)
    assert [op for op, _ in g0.normal] == ["sep_conv_3x3"] * 4
    k = 0.05
    g1, imp1 = perturbation_select(model, batches, _uniform(E), term=_sep_term(k), **kw)
    rise = imp1.ops["normal"][:, SEP3] - imp0.ops["normal"][:, SEP3]
    # removing sep_conv_3x3 (weight 1/8) lowers the term by 1/8 on every edge
    assert torch.allclose(rise, torch.full((E,), -k / N_OPS, dtype=torch.float64), atol=1e-9)
    others = [o for o in range(N_OPS) if o not in (SEP3, PRIMITIVES.index("none"))]
    assert torch.equal(imp1.ops["normal"][:, others], imp0.ops["normal"][:, others])
    assert torch.equal(imp1.edges["normal"], imp0.edges["normal"])  # edges: term flat
    g2, _ = perturbation_select(model, batches, _uniform(E), term=_sep_term(50.0), **kw)
    assert "sep_conv_3x3" not in [op for op, _ in g2.normal]
    assert g2.reduce == g0.reduce


def test_ce_norm_balance_pulls_coef_times_the_loss():
    """``ce_norm``: the term's rises are scaled to the spread of the loss rises over the
    decision's candidates, so ``coef`` alone sets how hard it pulls, whatever the term's units."""
    loss = torch.tensor([float("nan"), 0.01, 0.02, 0.0, 0.03], dtype=torch.float64)
    term_rises = torch.tensor([0.0, -5.0, -5.0, 0.0, -100.0], dtype=torch.float64)  # any units
    for coef in (0.5, 2.0):
        out = Term(lambda w: torch.zeros(()), coef, "ce_norm").combine(loss, term_rises)
        ok = torch.isfinite(loss)
        d_loss, d_term = loss[ok] - loss[ok].mean(), out[ok] - loss[ok]
        d_term = d_term - d_term.mean()
        assert math.isnan(out[0])
        assert float(d_term.norm()) == pytest.approx(coef * float(d_loss.norm()), rel=1e-9)
    flat = Term(lambda w: torch.zeros(()), 1.0, "ce_norm").combine(
        loss, torch.zeros(5, dtype=torch.float64)
    )
    assert torch.equal(flat[1:], loss[1:])  # a flat term changes nothing


def test_log_bound_of_weights():
    """``log_weights=True`` reads mixing weights as they are: at the softmax of the logits it is
    the bound of the logits; removing an op without renormalising lowers the bound by that op's
    share, and removing ``none`` changes nothing."""
    s = RACLSearch(TINY, ConstraintConfig(), num_classes=10, in_channels=3)
    s.model.train()
    s.model(torch.rand(8, 3, 8, 8), s.model.arch.mu())  # BN statistics give the ops a scale
    inputs = s.bound_inputs(n_iters=3)
    g = torch.Generator().manual_seed(0)
    z = ArchSample(*(torch.randn(t.shape, generator=g) for t in s.model.arch.mu().as_tuple()))
    nodes = s.model.nodes
    logs = ArchSample(
        torch.log_softmax(z.normal, -1),
        torch.log_softmax(z.reduce, -1),
        node_log_softmax(z.normal_edges, nodes),
        node_log_softmax(z.reduce_edges, nodes),
    )
    f = float(log_bound(z, inputs))
    assert float(log_bound(logs, inputs, log_weights=True)) == pytest.approx(f, rel=1e-6)
    none = PRIMITIVES.index("none")
    top = int(inputs.log_lam[~inputs.is_reduce][:, 0].mean(0).argmax())  # edge 0's largest op
    for o, lower in ((none, False), (top, True)):
        t = logs.normal.clone()
        t[0, o] = float("-inf")
        f2 = float(log_bound(dataclasses.replace(logs, normal=t), inputs, log_weights=True))
        assert (f2 < f - 1e-6) if lower else f2 == pytest.approx(f, rel=1e-6)


def _search(enabled: bool = True, balance: str = "ce_norm") -> RACLSearch:
    c = ConstraintConfig(enabled=enabled, balance=balance, kappa=0.05, threshold="tracking")
    s = RACLSearch(TINY, c, num_classes=10, in_channels=3)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    s.weight_step(x, y)
    s.arch_step(x, y)  # sets the threshold and the dual
    return s


def test_constraint_term_follows_the_dual():
    """Off, or met with a spent dual: no term (the CE decides). Active: its multiplier is the
    Lagrangian's ``y + rho max(0, h / unit)``, its value the bound of the mixing weights, and
    removing an edge's largest-lambda op lowers it more than removing its smallest-lambda op."""
    s = _search(enabled=False)
    assert constraint_term(s) is None
    s = _search()
    s.constraint.threshold, s.constraint.log_lambda_bar, s.constraint.y = "absolute", 1e6, 0.0
    assert constraint_term(s) is None
    for balance in ("ce_norm", "none"):
        s = _search(balance=balance)
        s.constraint.y = 2.0
        term = constraint_term(s)
        assert term is not None and term.coef >= 2.0 and term.balance == balance
        base = base_logits(s)
        w = {
            "normal": torch.softmax(base.normal, -1),
            "reduce": torch.softmax(base.reduce, -1),
            "normal_edges": torch.softmax(base.normal_edges, -1),  # any positive weights do
            "reduce_edges": torch.softmax(base.reduce_edges, -1),
        }
        logs = ArchSample(*(torch.log(w[k]) for k in KEYS))
        inputs = s.bound_inputs(update=False)
        f = float(log_bound(logs, inputs, log_weights=True))
        assert float(term.value(w)) == pytest.approx(f, rel=1e-6)
        lam = inputs.log_lam[~inputs.is_reduce].mean(0)  # [E, ops]
        top = int(lam[0].argmax())
        low = int(lam[0].nan_to_num(neginf=float("inf")).argmin())  # never `none` (-inf)
        assert low != top
        drop = -term.rises(w, "normal", [(0, top), (0, low)])
        assert torch.isfinite(drop).all() and drop[0] > 0 and drop[0] > drop[1]


def test_genotype_log_bound_by_hand():
    """The discrete genotype's bound: every node of a cell sums its two kept edges, each edge
    its one op, so with every edge ``skip_connect`` from the cell inputs a node's factor is
    ``ln(lambda_a + lambda_b)`` of the two skips (1 in a normal cell; a factorised reduction in
    a reduction cell), a cell's ``sum of node factors + ln(nodes) / 2 + pre`` and the network's
    ``sum relu(cell) + ln C``; sep convs everywhere give a larger bound."""
    s = RACLSearch(TINY, ConstraintConfig(), num_classes=10, in_channels=3)
    s.model.train()
    s.model(torch.rand(8, 3, 8, 8), s.model.arch.mu())  # BN statistics give the ops a scale
    nodes, skip_op = s.model.nodes, PRIMITIVES.index("skip_connect")
    cell = [("skip_connect", i) for _ in range(nodes) for i in (0, 1)]
    concat = tuple(range(2, nodes + 2))
    skip = Genotype(cell, concat, cell, concat)
    inputs = s.bound_inputs(update=False)
    index = {end: e for e, end in enumerate(edge_endpoints(nodes))}
    hand = inputs.log_c
    for c in range(len(inputs.is_reduce)):
        lam = inputs.log_lam[c].double().exp()
        factors = [
            max(0.0, math.log(lam[index[(0, j + 2)], skip_op] + lam[index[(1, j + 2)], skip_op]))
            for j in range(nodes)
        ]
        hand += max(0.0, sum(factors) + 0.5 * math.log(nodes) + float(inputs.log_pre[c]))
    assert genotype_log_bound(s, skip) == pytest.approx(hand, rel=1e-5)
    sep = [("sep_conv_3x3", i) for _, i in cell]
    assert genotype_log_bound(s, Genotype(sep, concat, sep, concat)) > hand
