"""The chance constraint's choices are registries (issue 18): estimators, bounds, mixtures,
thresholds and balances. Every test here runs over every entry, so a new entry is one line in
its registry plus whatever property of its own it promises.

Synthetic op constants on the 2-node cell (5 edges), no supernet: milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from rarn.config import ConfigError, ConstraintConfig, load_config, with_overrides
from rarn.nas.balance import BALANCES, arch_gradients
from rarn.nas.constraint import (
    BOUNDS,
    ESTIMATORS,
    MIXTURES,
    THRESHOLDS,
    BoundInputs,
    ChanceConstraint,
    log_bound,
)
from rarn.nas.supernet import ArchDistribution
from rarn.space.genotype import edge_endpoints
from rarn.space.ops import PRIMITIVES

NODES = 2
E = len(edge_endpoints(NODES))


def _inputs(seed: int = 0) -> BoundInputs:
    g = torch.Generator().manual_seed(seed)
    log_lam = torch.randn(3, E, len(PRIMITIVES), generator=g).abs()
    log_lam[..., PRIMITIVES.index("none")] = -math.inf
    return BoundInputs(log_lam, torch.tensor([False, True, False]), 0.5, NODES, partial_channels=4)


def _arch(seed: int = 0) -> ArchDistribution:
    return ArchDistribution(NODES, generator=torch.Generator().manual_seed(seed))


TABLES = {
    "estimator": ESTIMATORS,
    "bound": BOUNDS,
    "mixture": MIXTURES,
    "threshold": THRESHOLDS,
    "balance": BALANCES,
}


@pytest.mark.parametrize("key", list(TABLES))
def test_the_registry_is_the_config_choice(key: str, monkeypatch) -> None:
    """The config accepts exactly a registry's names (no second list): every entry loads, an
    unknown name is an error naming the key and every entry, and an entry added to the table
    alone (as a new estimator would be) is accepted with no other file touched."""
    base = load_config(None)
    for name in TABLES[key]:
        assert getattr(with_overrides(base, {f"constraint.{key}": name}).constraint, key) == name
    with pytest.raises(ConfigError, match=rf"constraint\.{key}: 'nope' not allowed") as e:
        with_overrides(base, {f"constraint.{key}": "nope"})
    assert all(name in str(e.value) for name in TABLES[key])
    monkeypatch.setitem(TABLES[key], "added_by_the_test", next(iter(TABLES[key].values())))
    cfg = with_overrides(base, {f"constraint.{key}": "added_by_the_test"})
    assert getattr(cfg.constraint, key) == "added_by_the_test"


@pytest.mark.parametrize("mixture", list(MIXTURES))
@pytest.mark.parametrize("bound", list(BOUNDS))
def test_every_bound_and_mixture_is_finite_and_differentiable(bound: str, mixture: str) -> None:
    mu = _arch().mu()
    f = log_bound(mu, _inputs(), bound, mixture)
    assert f.shape == () and math.isfinite(float(f.detach()))
    assert torch.equal(f, BOUNDS[bound](mu, _inputs(), mixture))
    grads = torch.autograd.grad(f, mu.as_tuple(), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("mixture", list(MIXTURES))
def test_a_mixture_leaves_out_only_known_ops(mixture: str) -> None:
    assert set(MIXTURES[mixture]) <= set(PRIMITIVES)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_gives_finite_moments_near_the_median(estimator: str) -> None:
    arch, inputs = _arch(), _inputs()
    g = torch.Generator().manual_seed(1)
    mu_f, sigma_f = ESTIMATORS[estimator](arch, inputs, "product", "all", g, 256)
    assert math.isfinite(float(mu_f)) and float(sigma_f) >= 0
    median = float(log_bound(arch.mu(), inputs, "product", "all"))
    assert abs(float(mu_f) - median) < 3 * float(sigma_f) + 0.5


@pytest.mark.parametrize("threshold", list(THRESHOLDS))
def test_every_threshold_lies_below_the_reference_unless_absolute(threshold: str) -> None:
    arch, inputs = _arch(), _inputs()
    c = ChanceConstraint(threshold=threshold, kappa=0.1, log_lambda_bar=-3.0)
    bar = c.update_threshold(arch.mu(), inputs, "product", "all")
    ref = float(log_bound(arch.mu(), inputs, "product", "all"))
    if THRESHOLDS[threshold].level is None:
        assert bar == -3.0
    else:
        assert bar == pytest.approx(ref - 0.1 * abs(ref))
    # new weights: only a tracking threshold follows them
    moved = c.update_threshold(arch.mu(), _inputs(seed=1), "product", "all")
    assert (moved != bar) == THRESHOLDS[threshold].tracks


@pytest.mark.parametrize("balance", list(BALANCES))
def test_every_balance_scales_only_the_constraint(balance: str) -> None:
    arch = _arch()
    params = list(arch.parameters())
    is_mean = [n.startswith("mu_") for n, _ in arch.named_parameters()]

    def parts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu = arch.mu()
        ce = sum((t**2).sum() for t in mu.as_tuple())
        mu_f = log_bound(mu, _inputs(), "product", "all")
        return ce, mu_f, 0.1 * sum(t.sum() for t in arch.sigma().as_tuple())

    no_pull, _ = arch_gradients(*parts(), 1.28, 0.0, params, is_mean, balance)
    pulled, stats = arch_gradients(*parts(), 1.28, 2.0, params, is_mean, balance)
    assert stats["penalty_ce_ratio"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(no_pull, pulled))
    if balance == "ce_norm":
        assert stats["penalty_ce_ratio"] == pytest.approx(2.0)  # coef x the CE's own norm


def test_the_balance_decides_how_the_constraint_measures_h() -> None:
    for name, rule in BALANCES.items():
        c = ChanceConstraint.from_config(ConstraintConfig(balance=name))
        assert c.relative is rule.relative
