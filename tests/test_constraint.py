import math

import pytest
import torch
from scipy.stats import norm

from rarn.config import ConstraintConfig, SearchConfig
from rarn.nas.constraint import (
    ChanceConstraint,
    delta_moments,
    log_bound,
    monte_carlo_moments,
    satisfaction_probability,
)
from rarn.nas.decode import quantile_logits
from rarn.nas.search import RACLSearch
from rarn.space.ops import PRIMITIVES


@pytest.fixture(scope="module")
def search():
    s = RACLSearch(
        SearchConfig(init_channels=8, layers=5, fused=False),
        ConstraintConfig(),
        num_classes=10,
        in_channels=1,
    )
    s.model.train()
    with torch.no_grad():  # real BN statistics, so the op constants are those of a trained net
        for _ in range(5):
            s.model(torch.rand(16, 1, 8, 8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in s.model.arch.NAMES:
            mu = getattr(s.model.arch, f"mu_{n}")
            mu.copy_(torch.randn(mu.shape, generator=g))
    return s


@pytest.mark.parametrize("bound", ["product", "node_mean"])
@pytest.mark.parametrize("mixture", ["all", "no_none", "parametric"])
def test_delta_agrees_with_large_monte_carlo(search, bound, mixture):
    """Stated tolerance at sigma = 0.3 (the default init): 0.15 nats in mu_F, 10 % in sigma_F."""
    inputs = search.bound_inputs(50)
    arch = search.model.arch
    mu_f, sigma_f = delta_moments(arch.mu(), arch.sigma(), inputs, bound, mixture)
    with torch.no_grad():
        mc_mu, mc_sigma = monte_carlo_moments(
            arch.sample(torch.Generator().manual_seed(1), n=4000), inputs, bound, mixture
        )
    assert abs(float(mu_f) - float(mc_mu)) <= 0.15
    assert abs(float(sigma_f) / float(mc_sigma) - 1) <= 0.10


def test_delta_is_differentiable_in_mu_and_sigma(search):
    inputs = search.bound_inputs(1)
    arch = search.model.arch
    mu_f, sigma_f = delta_moments(arch.mu(), arch.sigma(), inputs, "node_mean", "parametric")
    grads = torch.autograd.grad(mu_f + 1.28 * sigma_f, arch.parameters(), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads[1::2])  # log-sigma gets a gradient


def test_mixture_changes_the_bound(search):
    inputs = search.bound_inputs(1)
    mu = search.model.arch.mu()
    all_ops = float(log_bound(mu, inputs, "product", "all"))
    param = float(log_bound(mu, inputs, "product", "parametric"))
    assert math.isfinite(all_ops) and math.isfinite(param) and all_ops != param
    with pytest.raises(ValueError, match="unknown mixture"):
        log_bound(mu, inputs, "product", "convs")


def test_cdf_form_and_dual_update():
    c = ChanceConstraint(eta=0.9, rho=0.5, threshold="absolute", log_lambda_bar=2.0)
    assert math.isclose(c.z_eta, norm.ppf(0.9))
    for mu_f, sigma_f in [(1.0, 0.5), (1.5, 0.4), (2.5, 0.1), (1.9, 0.05)]:
        h = float(c.h(torch.tensor(mu_f), torch.tensor(sigma_f)))
        p = satisfaction_probability(mu_f, sigma_f, 2.0)
        assert (h <= 0) == (p >= 0.9 - 1e-12)
    assert c.dual_step(-1.0) == 0.0  # y stays non-negative
    assert c.dual_step(2.0) == 1.0
    assert float(c.penalty(torch.tensor(2.0))) == 1.0 * 2.0 + 0.25 * 4.0
    with pytest.raises(ValueError, match="eta"):
        ChanceConstraint(eta=0.3)
    with pytest.raises(ValueError, match="threshold"):
        ChanceConstraint(threshold="loose")


def test_relative_threshold_is_fixed_and_tracking_follows_weights(search):
    inputs = search.bound_inputs(1)
    mu = search.model.arch.mu()
    rel = ChanceConstraint(threshold="relative", kappa=0.1)
    first = rel.update_threshold(mu, inputs, "product", "all")
    ref = float(log_bound(mu, inputs, "product", "all"))
    assert math.isclose(first, ref - 0.1 * abs(ref), rel_tol=1e-6)
    shifted = type(inputs)(inputs.log_lam + 1.0, inputs.is_reduce, inputs.log_c, inputs.nodes)
    assert rel.update_threshold(mu, shifted, "product", "all") == first
    tr = ChanceConstraint(threshold="tracking", kappa=0.0)
    a = tr.update_threshold(mu, inputs, "node_mean", "all")
    b = tr.update_threshold(mu, shifted, "node_mean", "all")
    assert math.isclose(b - a, 1.0, rel_tol=1e-5)  # every op constant x e -> per-node bound + 1


def test_confidence_reaches_the_default_decoding():
    """Spec §2.8: the constraint shrinks sigma only where the bound is sensitive, and the decision
    must see it. The default decodings start from the eta-lower quantile (the per-epoch
    magnitude rule, and perturbation's base architecture), so shrinking the convolutions' sigma
    makes them win; the median alone ignores sigma."""
    s = RACLSearch(
        SearchConfig(init_channels=8, layers=3, nodes=2),
        ConstraintConfig(),
        num_classes=10,
        in_channels=1,
    )
    assert s.cfg.decode == "perturbation" and s.magnitude_rule == "quantile"
    arch = s.model.arch
    with torch.no_grad():
        for n in arch.NAMES:
            getattr(arch, f"mu_{n}").copy_(0.01 * torch.randn(getattr(arch, f"mu_{n}").shape))
    before = {mode: s.decode(mode) for mode in ("median", "quantile")}
    convs = [i for i, p in enumerate(PRIMITIVES) if p.startswith(("sep", "dil"))]
    with torch.no_grad():
        for sig in (arch.log_sigma_normal, arch.log_sigma_reduce):
            sig[:, convs] = math.log(0.01)
    assert s.decode("median") == before["median"]
    after = s.decode()
    assert after != before["quantile"]
    assert all(op.startswith(("sep", "dil")) for op, _ in (*after.normal, *after.reduce))
    base = quantile_logits(s.model, s.ccfg.eta)  # what perturbation starts from
    w = torch.softmax(base.normal, -1)
    assert (w[:, convs].min(1).values > w[:, [1, 2, 3]].max(1).values).all()
