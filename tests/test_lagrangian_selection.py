"""Selection on the search's objective (``search.decode_objective: lagrangian``): an op's
importance is the rise of the validation CE plus the chance constraint's Lagrangian term when it
is removed, so the constraint reaches the genotype through the selection."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_perturbation import N_OPS, SEP3, SKIP, _Linear, _uniform

from rarn.config import ConstraintConfig, SearchConfig
from rarn.nas.constraint import log_bound
from rarn.nas.ops import PRIMITIVES
from rarn.nas.perturbation import perturbation_select
from rarn.nas.search import RACLSearch
from rarn.nas.selection import base_logits, lagrangian_penalty
from rarn.nas.supernet import ArchSample, node_log_softmax

KEYS = ("normal", "reduce", "normal_edges", "reduce_edges")
TINY = SearchConfig(
    init_channels=4, layers=3, nodes=2, partial_channels=1, batch_size=8, epochs=1, seed=0
)


def _sep_penalty(k: float):
    """A penalty that charges ``k`` per unit of sep_conv_3x3 weight in the normal cell."""
    return lambda w: k * w["normal"][:, SEP3].sum()


@pytest.mark.parametrize("estimate", ["exact", "first_order"])
def test_penalty_enters_every_importance(estimate):
    """The hand case of test_perturbation: each edge's best op is sep_conv_3x3. The importance
    is the CE rise plus the penalty's rise, exactly (``exact``) or to first order; a penalty that
    outweighs the CE's pull turns every normal edge away from sep_conv_3x3."""
    E, nodes = 5, 2
    c_n = torch.zeros(E, N_OPS)
    c_n[:, SEP3] = torch.tensor([2.0, 1.0, 0.2, 3.0, 1.5])
    c_n[:, SKIP] = 0.5
    model = _Linear(c_n, torch.zeros(E, N_OPS), nodes)
    batches = [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))]
    kw = {"estimate": estimate, "progressive": False}
    g0, imp0 = perturbation_select(model, batches, _uniform(E), **kw)
    assert [op for op, _ in g0.normal] == ["sep_conv_3x3"] * 4
    k = 0.05
    g1, imp1 = perturbation_select(model, batches, _uniform(E), penalty=_sep_penalty(k), **kw)
    rise = imp1.ops["normal"][:, SEP3] - imp0.ops["normal"][:, SEP3]
    # removing sep_conv_3x3 (weight 1/8) lowers the penalty by k/8, on every edge
    assert torch.allclose(rise, torch.full((E,), -k / N_OPS, dtype=torch.float64), atol=1e-6)
    others = [o for o in range(N_OPS) if o not in (SEP3, PRIMITIVES.index("none"))]
    assert torch.allclose(imp1.ops["normal"][:, others], imp0.ops["normal"][:, others], atol=1e-6)
    assert imp1.base_loss == pytest.approx(imp0.base_loss + k * E / N_OPS, rel=1e-6)
    g2, _ = perturbation_select(model, batches, _uniform(E), penalty=_sep_penalty(50.0), **kw)
    assert "sep_conv_3x3" not in [op for op, _ in g2.normal]
    assert g2.reduce == g0.reduce  # the penalty charges the normal cell only


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


def test_lagrangian_penalty_follows_the_dual():
    """Off, or met with a spent dual: no penalty (the selection is the CE's). Active: the
    weight is ``c * ||dCE/dz|| / ||dh/dmu||`` (ce_norm) or ``c`` (none), the penalty is that weight
    times the bound of the mixing weights, and removing an edge's largest-lambda op lowers it
    more than removing its smallest-lambda op."""
    batches = [(torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,)))]
    s = _search(enabled=False)
    assert lagrangian_penalty(s, batches, base_logits(s)) == (None, 0.0)
    s = _search()
    s.constraint.threshold, s.constraint.log_lambda_bar, s.constraint.y = "absolute", 1e6, 0.0
    assert lagrangian_penalty(s, batches, base_logits(s)) == (None, 0.0)
    for balance in ("ce_norm", "none"):
        s = _search(balance=balance)
        s.constraint.y = 2.0
        penalty, weight = lagrangian_penalty(s, batches, base_logits(s))
        assert penalty is not None and weight > 0
        if balance == "none":  # unit 1, c = y + rho max(0, h)
            assert weight >= 2.0
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
        assert float(penalty(w)) == pytest.approx(weight * f, rel=1e-5)
        lam = inputs.log_lam[~inputs.is_reduce].mean(0)  # [E, ops]
        e = 0
        top = int(lam[e].argmax())
        low = int(lam[e].nan_to_num(neginf=float("inf")).argmin())  # never `none` (-inf)
        assert low != top

        drop = {}
        for o in (top, low):
            t = w["normal"].clone()
            t[e, o] = 0.0
            drop[o] = float(penalty(w)) - float(penalty({**w, "normal": t}))
        assert math.isfinite(drop[top]) and drop[top] > 0
        assert drop[top] > drop[low]
