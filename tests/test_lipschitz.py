import math

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

from rarn.lipschitz.certify import module_log_lipschitz
from rarn.lipschitz.estimator import LipschitzEstimator, log_lipschitz, power_iteration
from rarn.lipschitz.rules import (
    RULES,
    Rule,
    Term,
    avg_pool_lipschitz,
    certified_log_bound,
    rule_for,
)
from rarn.space.ops import PRIMITIVES, build_op


def test_power_iteration_matches_matrix_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 12, 7, generator=g)
    u = torch.randn(5, 12, generator=g)
    sigma, u = power_iteration(w, u, n_iters=200)
    exact = torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(sigma, exact, rtol=1e-4, atol=1e-5)
    # persistent vectors: one more step from a converged vector stays converged
    sigma1, _ = power_iteration(w, u, n_iters=1)
    torch.testing.assert_close(sigma1, exact, rtol=1e-4, atol=1e-5)


def test_power_iteration_underestimates_with_few_steps():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 32, generator=g)
    sigma, _ = power_iteration(w, torch.randn(32, generator=g), n_iters=1)
    assert float(sigma) <= float(torch.linalg.matrix_norm(w, ord=2)) + 1e-5


def test_estimator_matches_svd_on_pointwise_convs():
    torch.manual_seed(0)
    convs = [nn.Conv2d(6, 4, 1, bias=False) for _ in range(3)] + [nn.Linear(5, 3)]
    est = LipschitzEstimator(convs)
    for _ in range(100):
        lam = est(n_iters=1)
    for m, l in zip(convs, lam):
        exact = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert math.isclose(float(l), float(exact.log()), rel_tol=1e-4, abs_tol=1e-4)
    # the vectors persist in the state dict
    assert any(k.startswith("u") for k in est.state_dict())


def test_avg_pool_constant():
    assert math.isclose(avg_pool_lipschitz(3, 1, 1, False), 7 / 6, rel_tol=1e-6)
    assert math.isclose(avg_pool_lipschitz(3, 1, 1, True), 1.0, rel_tol=1e-6)


def _jacobian_norm(f, x, iters=15):
    """Largest singular value of the Jacobian of f at x by power iteration on J^T J (also used
    by tests/test_bound_corners.py)."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    s = 0.0
    _, pull = vjp(f, x)  # J^T at x, once: the pullback is linear in its argument
    for _ in range(iters):
        _, jv = jvp(f, (x,), (v,))
        (jtjv,) = pull(jv)
        s = float(jv.detach().norm())
        v = jtjv / jtjv.norm().clamp_min(1e-12)
    return s


def _warm_bn(op, C, size):
    op.train()
    with torch.no_grad():
        for _ in range(5):
            op(torch.randn(8, C, size, size) * 2)
    op.eval()


@pytest.mark.parametrize("name", [p for p in PRIMITIVES if p != "none"])
@pytest.mark.parametrize("stride", [1, 2])
def test_op_bound_exceeds_local_gradient_norm(name, stride):
    torch.manual_seed(0)
    C, size = 4, 8
    op = build_op(name, C, stride, affine=False)
    if "pool" in name:  # as in the supernet: pools are followed by BN
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
    _warm_bn(op, C, size)
    bound = math.exp(log_lipschitz(op, n_iters=200))
    for seed in range(2):
        x = torch.randn(1, C, size, size, generator=torch.Generator().manual_seed(seed))
        local = _jacobian_norm(op, x)
        assert local <= bound * (1 + 1e-3), (name, stride, local, bound)
    assert math.isfinite(bound)


def test_none_is_minus_infinity_and_bn_matters():
    assert log_lipschitz(build_op("none", 4, 1)) == float("-inf")
    op = build_op("sep_conv_3x3", 4, 1, affine=False)
    _warm_bn(op, 4, 8)
    assert log_lipschitz(op, include_bn=True) != log_lipschitz(op, include_bn=False)


class _Double(nn.Module):
    """A layer the table does not know: ``x -> 2x``."""

    def forward(self, x):
        return 2 * x


def test_estimator_and_certifier_read_one_rule_table(monkeypatch):
    chain = nn.Sequential(nn.ReLU(), _Double(), nn.Identity())
    with pytest.raises(NotImplementedError, match="_Double"):
        log_lipschitz(chain)
    with pytest.raises(NotImplementedError, match="_Double"):
        module_log_lipschitz(chain)
    # One new row teaches both the search-time estimate and the certified bound.
    log2 = math.log(2.0)
    rule = Rule(lambda m, _: [Term("const", value=log2)], lambda m, _: log2)
    monkeypatch.setitem(RULES, _Double, rule)
    assert log_lipschitz(chain) == pytest.approx(log2)
    assert module_log_lipschitz(chain) == log2


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
def test_certified_op_bound_is_the_rule_tables(name, stride):
    torch.manual_seed(0)
    op = build_op(name, 4, stride, affine=True)
    _warm_bn(op, 4, 8)
    bound = module_log_lipschitz(op)
    assert bound == certified_log_bound(op)
    assert bound == rule_for(op).certified(op, certified_log_bound)
    if name in ("none", "max_pool_3x3") or (name, stride) == ("skip_connect", 1):
        # No weights and no map-size dependence: both faces give the same number (the estimator
        # returns float32).
        assert log_lipschitz(op) == pytest.approx(bound, rel=1e-7)
