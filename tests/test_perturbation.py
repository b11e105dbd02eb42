"""Selection by perturbation (rarn.nas.perturbation) and the decoding remedies (rarn.nas.decode):
a hand-computed case, a supernet in which one op is known to matter, the confidence (sigma) in
the decision, and the P-DARTS cap."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rarn.config import ConstraintConfig, SearchConfig
from rarn.nas.decode import cap_parameter_free, decode, quantile_logits
from rarn.nas.loop import arch_start, ramped_kappa
from rarn.nas.perturbation import ESTIMATES, perturbation_select, supernet_loss
from rarn.nas.supernet import ArchSample, Supernet
from rarn.nas.supernet_loss import frozen_statistics
from rarn.space.genotype import Genotype
from rarn.space.ops import PRIMITIVES

N_OPS = len(PRIMITIVES)
SEP3, DIL3, SKIP = (PRIMITIVES.index(p) for p in ("sep_conv_3x3", "dil_conv_3x3", "skip_connect"))


class _Linear(nn.Module):
    """A 'supernet' whose class-0 logit is ``s = sum_e beta_e sum_o c_eo w_eo`` (normal) plus the
    same for the reduction cell, class 1 at 0: ``CE = softplus(-s)`` for labels 0, by hand."""

    def __init__(self, c_normal: torch.Tensor, c_reduce: torch.Tensor, nodes: int) -> None:
        super().__init__()
        self.c_n, self.c_r = c_normal, c_reduce
        self.arch = SimpleNamespace(nodes=nodes)
        self.bn = nn.BatchNorm1d(1)  # a buffer that must not move

    def forward(self, x, z=None, *, weights):
        w_n, w_r, b_n, b_r = weights
        s = (b_n * (self.c_n * w_n).sum(1)).sum() + (b_r * (self.c_r * w_r).sum(1)).sum()
        self.bn(x[:, :1] * 0 + 1)  # moves the running statistics in train mode
        return torch.stack([s.expand(len(x)), torch.zeros(len(x))], dim=1)


def _uniform(E: int) -> ArchSample:
    return ArchSample(torch.zeros(E, N_OPS), torch.zeros(E, N_OPS), torch.zeros(E), torch.zeros(E))


def test_hand_computed_importance_and_genotype():
    """nodes=2 (E=5). Edge e's op o contributes c_eo: one op per edge is clearly best, and in
    node 3 (edges 2, 3, 4) edge 2 contributes least. Importances of the first projected edge are
    ``softplus(-s') - softplus(-s)`` with ``s' = s - beta c w`` exactly; the genotype takes each
    edge's best op and drops edge 2."""
    E, nodes = 5, 2
    c_n = torch.zeros(E, N_OPS)
    c_n[:, SEP3] = torch.tensor([2.0, 1.0, 0.2, 3.0, 1.5])
    c_n[:, SKIP] = 0.5
    c_r = torch.zeros(E, N_OPS)
    c_r[:, DIL3] = torch.tensor([1.0, 1.0, 0.1, 1.0, 1.0])
    model = _Linear(c_n, c_r, nodes)
    batches = [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))]
    before = model.bn.running_mean.clone()
    g, imp = perturbation_select(model, batches, _uniform(E), estimate="exact", progressive=True)
    assert torch.equal(model.bn.running_mean, before)  # batch statistics, nothing kept

    # by hand, edge 0 of the normal cell (projected first, natural order)
    w, beta = 1 / N_OPS, torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])
    s = float((beta * c_n.sum(1) * w).sum() + (beta * c_r.sum(1) * w).sum())
    base = math.log1p(math.exp(-s))
    assert imp.base_loss == pytest.approx(base, rel=1e-6)
    for o in (SEP3, SKIP, DIL3):
        s2 = s - float(beta[0] * c_n[0, o] * w)
        assert imp.ops["normal"][0, o] == pytest.approx(math.log1p(math.exp(-s2)) - base, rel=1e-5)
    assert math.isnan(imp.ops["normal"][0, PRIMITIVES.index("none")])
    assert g.normal == (
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 2),
    )
    assert [op for op, _ in g.reduce] == ["dil_conv_3x3"] * 4
    assert [i for _, i in g.reduce[2:]] == [1, 2]
    # one shot (no projection): the same choice here, every importance from the base supernet
    g1, imp1 = perturbation_select(model, batches, _uniform(E), estimate="exact")
    assert g1 == g and imp1.evaluations < imp.evaluations
    # first order: -w dL/dw = sigmoid(-s) beta c w, by hand, from one backward pass
    g2, imp2 = perturbation_select(model, batches, _uniform(E))
    sig = 1 / (1 + math.exp(s))
    expect = sig * beta[:, None] * c_n * w
    ops = imp2.ops["normal"].clone()
    ops[:, PRIMITIVES.index("none")] = 0.0
    assert torch.allclose(ops, expect.double(), rtol=1e-5, atol=1e-9)
    assert g2 == g and imp2.evaluations == 5  # base loss, 2 x (forward + backward)


def test_equal_means_lower_sigma_wins():
    """Spec §2.8: the eta-lower quantile decides, so of two ops with equal mean the one with the
    smaller sigma ranks first, in the quantile decoding and in the perturbation selection that
    starts from the quantile (the less certain op weighs less, and removing it costs less)."""
    model = Supernet(C=4, num_classes=2, layers=3, in_channels=1, nodes=1, k=1)
    arch = model.arch
    with torch.no_grad():
        for name in arch.NAMES:
            getattr(arch, f"mu_{name}").zero_()
            getattr(arch, f"log_sigma_{name}").fill_(math.log(0.5))
        for cell in ("normal", "reduce"):
            getattr(arch, f"mu_{cell}")[:, [SEP3, DIL3]] = 1.0
            getattr(arch, f"log_sigma_{cell}")[:, SEP3] = math.log(1.0)  # unsure
            getattr(arch, f"log_sigma_{cell}")[:, DIL3] = math.log(0.1)  # confident
    g = decode(model, "quantile", eta=0.9)
    assert {op for op, _ in g.normal + g.reduce} == {"dil_conv_3x3"}
    # the median cannot tell them apart: the tie goes to the first column (sep_conv_3x3)
    g_median = decode(model, "median")
    assert {op for op, _ in g_median.normal + g_median.reduce} == {"sep_conv_3x3"}
    # perturbation: two identical ops (same weights) -> only their quantile weights differ
    c_n = torch.zeros(2, N_OPS)
    c_n[:, [SEP3, DIL3]] = 1.0
    lin = _Linear(c_n, c_n.clone(), nodes=1)
    q = quantile_logits(model, 0.9)
    for estimate in ESTIMATES:
        batch = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]
        gp, _ = perturbation_select(lin, batch, q, estimate=estimate)
        assert {op for op, _ in gp.normal + gp.reduce} == {"dil_conv_3x3"}, estimate


class _Zero(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride] * 0.0


@pytest.fixture(scope="module")
def known_op():
    """A supernet whose every mixed op but sep_conv_3x3 outputs zeros, trained to fit its data."""
    torch.manual_seed(0)
    model = Supernet(C=4, num_classes=3, layers=3, in_channels=1, nodes=2, k=1, fused=False)
    for cell in model.cells:
        for edge in cell.edges:
            for i, name in enumerate(PRIMITIVES):
                if name not in ("sep_conv_3x3", "none"):
                    edge.ops[i] = _Zero(edge.stride)
    x, y = torch.rand(24, 1, 6, 6), torch.randint(0, 3, (24,))
    opt = torch.optim.Adam(model.weight_parameters(), lr=0.02)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_picks_the_only_op_that_matters(known_op):
    """A supernet whose every mixed op but sep_conv_3x3 outputs zeros, trained to fit its data:
    removing any other op changes nothing, removing sep_conv_3x3 raises the loss, so every edge
    of both cells selects it, one shot and progressively (edges in a random order)."""
    model, x, y = known_op
    for progressive in (False, True):  # one shot (the default), and darts-pt's order
        gen = torch.Generator().manual_seed(3)
        g, imp = perturbation_select(
            model,
            [(x, y)],
            model.arch.mu(),
            estimate="exact",
            progressive=progressive,
            generator=gen,
        )
        assert {op for op, _ in g.normal + g.reduce} == {"sep_conv_3x3"}, g
        for cell in ("normal", "reduce"):
            others = imp.ops[cell][:, [i for i in range(N_OPS) if i not in (SEP3, 0)]]
            assert others.abs().max() < 1e-6
            sep3 = imp.ops[cell][:, SEP3]
            assert sep3.max() > 1e-3
            # Every kept edge is one whose sep_conv_3x3 the fit needs (its removal raises the
            # loss). An edge whose trained sep_conv_3x3 hurts the fit (removal lowers the loss;
            # on some CPUs' kernels one of the five does) ties its zero ops above it and is
            # never kept: each node keeps the two edges whose removal hurts most.
            pairs = getattr(g, cell)
            kept = [sum(range(2, 2 + i // 2)) + inp for i, (_, inp) in enumerate(pairs)]
            assert (sep3[kept] >= 0).all(), (cell, sep3, kept)


def test_supernet_loss_leaves_running_statistics():
    model = Supernet(C=4, num_classes=2, layers=3, in_channels=1, nodes=1, k=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.mixing_weights(model.arch.mu())
    supernet_loss(model, [(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))], w)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_restore_per_selection_gives_the_per_pass_losses():
    """A selection restores the running statistics once, at its end, not after every pass: the
    passes do write them, never read them (train mode), so the losses are the per-pass ones."""
    model = Supernet(C=4, num_classes=2, layers=3, in_channels=1, nodes=1, k=2)
    batch = [(torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,)))]
    w = model.mixing_weights(model.arch.mu())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alone = [supernet_loss(model, batch, w) for _ in range(3)]
    with frozen_statistics(model):
        nested = [supernet_loss(model, batch, w) for _ in range(3)]
        written = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert any("running_mean" in k for k in written)  # the passes wrote the statistics
    assert nested == alone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cap_parameter_free_keeps_the_best_scored():
    normal = [
        ("skip_connect", 0),
        ("max_pool_3x3", 1),
        ("avg_pool_3x3", 0),
        ("skip_connect", 2),
        ("sep_conv_3x3", 1),
        ("skip_connect", 3),
        ("max_pool_3x3", 0),
        ("dil_conv_5x5", 4),
    ]
    reduce = (
        [("sep_conv_3x3", 0)] * 2
        + [("sep_conv_3x3", 1), ("sep_conv_3x3", 2)]
        + [("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("sep_conv_3x3", 4)]
    )
    reduce[1] = ("sep_conv_3x3", 1)
    g = Genotype(normal, (2, 3, 4, 5), reduce, (2, 3, 4, 5))
    E = 14
    scores = {c: torch.zeros(E, N_OPS) for c in ("normal", "reduce")}
    scores["normal"][:, PRIMITIVES.index("skip_connect")] = 5.0  # skips score highest
    scores["normal"][:, DIL3] = 1.0  # the best convolution everywhere
    capped = cap_parameter_free(g, scores, 2)
    ops = [op for op, _ in capped.normal]
    assert sum(op in ("skip_connect", "max_pool_3x3", "avg_pool_3x3") for op in ops) == 2
    assert [op for op in ops if op == "skip_connect"] == ["skip_connect"] * 2  # the kept ones
    assert [i for _, i in capped.normal] == [i for _, i in g.normal]  # topology unchanged
    assert capped.reduce == g.reduce
    assert cap_parameter_free(g, scores, 8) == g


def test_warmup_in_steps_and_kappa_ramp():
    cfg = SearchConfig(warmup_epochs=2, warmup_min_steps=100)
    assert arch_start(cfg, 10) == 100 and arch_start(cfg, 80) == 160
    c = ConstraintConfig(kappa=0.1, kappa_ramp=0.5)
    ks = [ramped_kappa(c, t, 100) for t in range(100)]
    assert ks[0] == pytest.approx(0.1 / 50) and ks[49] == pytest.approx(0.1) and ks[-1] == 0.1
    assert all(a <= b for a, b in zip(ks, ks[1:]))
    assert ramped_kappa(ConstraintConfig(kappa=0.1), 0, 100) == 0.1


def test_robust_selection_attacks_each_candidate_and_picks_what_matters(known_op):
    """``perturbation_robust``: every loss is measured on PGD examples (inside the L-inf ball of
    ``robust_eval_eps``, in [0, 1]) made against the very supernet being measured, with its
    running statistics untouched; on the supernet where only sep_conv_3x3 carries signal the
    robust selection picks it. A fixed set of examples, made against the unperturbed supernet,
    picked max_pool on 2 of 4 normal edges: it rewards removing what the examples exploit."""
    from rarn.data import TensorImageDataset
    from rarn.nas.perturbation import FixedWeights
    from rarn.nas.selection import base_logits, robust_attack, selection_batches

    model, x, y = known_op
    cfg = SearchConfig(batch_size=8, decode_n=12, robust_eval_eps=0.05, robust_eval_steps=2)
    s = SimpleNamespace(cfg=cfg, ccfg=ConstraintConfig(), model=model, device=torch.device("cpu"))
    batches = selection_batches(s, TensorImageDataset(x, y))
    assert sum(len(b[1]) for b in batches) == 12
    attack, w = robust_attack(s), model.mixing_weights(base_logits(s))
    xc, yc = batches[0]
    with torch.no_grad():
        model.eval()  # the attack itself keeps the caller's mode: no statistic moves here
        xa = attack(FixedWeights(model, w), xc, yc)
        model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert (xa - xc).abs().max() <= 0.05 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert not torch.equal(xa, xc)
    assert supernet_loss(model, batches, w, attack) > supernet_loss(model, batches, w)
    g, _ = perturbation_select(model, batches, base_logits(s), estimate="exact", attack=attack)
    assert {op for op, _ in g.normal + g.reduce} == {"sep_conv_3x3"}, g
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
