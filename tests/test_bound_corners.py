"""The search's Lipschitz bound is a bound: every edge's and every cell's bound is at least the
measured Jacobian norm of the module as built (eval mode, tiny shapes), in the corners where the
architecture puts its weight on ``none``, on skips, or on the convolutions; and weakening one rule
(the depthwise factor, the partial-channel bypass) breaks it in some corner."""

import dataclasses
import math

import pytest
import torch
from test_lipschitz import _jacobian_norm  # tests/ is on the path (pytest's prepend import mode)

import rarn.lipschitz.estimator as estimator
from rarn.config import ConstraintConfig, SearchConfig
from rarn.nas.constraint import cell_log_bounds, edge_log_bounds
from rarn.nas.search import RACLSearch
from rarn.space.ops import OPS, PRIMITIVES

CORNERS = {
    "none": ("none",),
    "skip": ("skip_connect",),
    "conv": tuple(p for p in PRIMITIVES if OPS[p].kind in ("sep", "dil")),
}
SIZE = 8  # input side; the reduction cells see 8 x 8 and 4 x 4 maps


def _search() -> RACLSearch:
    cfg = SearchConfig(init_channels=8, layers=3, nodes=2, fused=False, seed=0)
    s = RACLSearch(cfg, ConstraintConfig(), num_classes=10, in_channels=3)
    s.model.train()
    with torch.no_grad():  # BN statistics of a network that has seen data
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            s.model(torch.rand(8, 3, SIZE, SIZE, generator=g))
    s.model.eval()
    return s


def _set_corner(s: RACLSearch, corner: str) -> None:
    cols = [PRIMITIVES.index(p) for p in CORNERS[corner]]
    with torch.no_grad():
        for mu in (s.model.arch.mu_normal, s.model.arch.mu_reduce):
            mu.zero_()
            mu[:, cols] = 6.0


def _cell_inputs(s: RACLSearch):
    """Per cell: its inputs (s0, s1) and mixing weights, on one image, median architecture."""
    w_n, w_r, b_n, b_r = s.model.mixing_weights(s.model.arch.mu())
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        s0 = s1 = s.model.stem(x)
        out = []
        for cell in s.model.cells:
            ow, ew = (w_r, b_r) if cell.reduction else (w_n, b_n)
            out.append((s0, s1, ow.detach(), ew.detach()))
            s0, s1 = s1, cell(s0, s1, ow, ew)
    return out


def _states(cell, s0, s1, ow, ew) -> list[torch.Tensor]:
    """The cell's preprocessed inputs and node states (the sources of its edges)."""
    with torch.no_grad():
        states, e = [cell.preprocess0(s0), cell.preprocess1(s1)], 0
        for _ in range(cell.nodes):
            n = len(states)
            states.append(
                sum(ew[e + i] * cell.edges[e + i](states[i], ow[e + i]) for i in range(n))
            )
            e += n
    return states


def _joint(cell, s0, s1, ow, ew):
    """The cell as a function of its two inputs, flattened into one vector."""
    n0 = s0.numel()
    return lambda t: cell(t[:n0].view(s0.shape), t[n0:].view(s1.shape), ow, ew)


def _measured(s: RACLSearch):
    """Measured Jacobian norms: ``[cells, E]`` per edge (at its source state) and ``[cells]``."""
    edges, cells = [], []
    for cell, (s0, s1, ow, ew) in zip(s.model.cells, _cell_inputs(s)):
        states = _states(cell, s0, s1, ow, ew)
        sources = [i for j in range(cell.nodes) for i in range(j + 2)]
        edges.append(
            [
                _jacobian_norm(lambda t, m=cell.edges[e], w=ow[e]: m(t, w), states[i], iters=20)
                for e, i in enumerate(sources)
            ]
        )
        joint = torch.cat([s0.flatten(), s1.flatten()])
        cells.append(_jacobian_norm(_joint(cell, s0, s1, ow, ew), joint, iters=20))
    return torch.tensor(edges), torch.tensor(cells)


def _bounds(s: RACLSearch, inputs=None):
    inputs = inputs if inputs is not None else s.bound_inputs(200)
    mu = s.model.arch.mu()
    with torch.no_grad():
        return edge_log_bounds(mu, inputs).exp(), cell_log_bounds(mu, inputs).exp()


@pytest.fixture(scope="module")
def corners():
    """Per corner: the search, its edge and cell bounds, and the measured norms."""
    out = {}
    for corner in CORNERS:
        s = _search()
        _set_corner(s, corner)
        out[corner] = (s, *_bounds(s), *_measured(s))
    return out


@pytest.mark.parametrize("corner", list(CORNERS))
def test_edge_and_cell_bounds_hold(corners, corner):
    _, edge_b, cell_b, edge_m, cell_m = corners[corner]
    assert (edge_m <= edge_b * (1 + 1e-3)).all(), (corner, edge_m, edge_b)
    assert (cell_m <= cell_b * (1 + 1e-3)).all(), (corner, cell_m, cell_b)
    if corner == "none":  # the bypass passes (K - 1) / K of the channels unchanged
        assert edge_m.min() > 0.99 and torch.allclose(edge_b, torch.ones_like(edge_b))


def test_dropping_the_bypass_breaks_the_bound(corners):
    """Without ``max(1, .)`` a `none`-heavy edge is bounded far below its measured norm 1 (the
    cells stay bounded: their node factors are clipped at 1 on their own)."""
    s, _, _, edge_m, _ = corners["none"]
    weak = dataclasses.replace(s.bound_inputs(200), partial_channels=1)
    edge_b, _ = _bounds(s, weak)
    assert (edge_m > edge_b * 1.5).all()


def _tighten(s: RACLSearch) -> None:
    """Positive weights and zero BN means: on positive inputs every conv op is linear and its
    layers' top singular vectors align (near-constant images), so its bound is almost tight."""
    with torch.no_grad():
        for m in s.model.cells.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.fill_(2.0 / m.weight[0].numel())  # depthwise l1 = 2; pointwise rank 1
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(0.25)  # gain 2


def test_weaker_depthwise_factor_breaks_the_bound(monkeypatch):
    """Setting every depthwise factor to 1 (instead of Young's ``max_c ||w_c||_1``) puts a tight
    conv-heavy edge's bound below its measured norm; the true rule stays above it."""
    s = _search()
    _set_corner(s, "conv")
    _tighten(s)
    cell, (_, s1, ow, _) = s.model.cells[0], _cell_inputs(s)[0]
    x = cell.preprocess1(s1).abs() + 1.0  # positive: every ReLU passes
    measured = _jacobian_norm(lambda t: cell.edges[1](t, ow[1]), x, iters=20)
    true_b = float(_bounds(s)[0][0, 1])
    real = estimator.depthwise_log_bound
    monkeypatch.setattr(estimator, "depthwise_log_bound", lambda w: real(w) * 0.0)
    weak_b = float(_bounds(s)[0][0, 1])
    assert measured <= true_b * (1 + 1e-3), (measured, true_b)
    assert weak_b < measured, (weak_b, measured)
    assert math.isfinite(true_b) and measured > 1.5  # the conv part, not the bypass
