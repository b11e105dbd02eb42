"""Grouped supernet passes (Supernet.grouped_forward) and the perturbation selection built on them.

G sets of mixing weights over G stacked copies of a batch, each copy weighed and (in training
mode) normalised on its own, must give the G separate passes' logits; the exact selection must
then score every candidate as one pass per loss does, with the same number of losses, and leave
the running statistics alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rarn.nas.perturbation import _Scorer, perturbation_select
from rarn.nas.supernet import Supernet
from rarn.nas.supernet_loss import frozen_statistics, supernet_loss, supernet_losses


def _supernet(k: int = 2, nodes: int = 4) -> Supernet:
    torch.manual_seed(0)
    # 5 cells: both reductions, a FactorizedReduce preprocessing after each, 2 x 2 maps at the end
    return Supernet(C=8, num_classes=4, layers=5, in_channels=1, nodes=nodes, k=k, fused=True)


def _trained(model: Supernet, x: torch.Tensor, y: torch.Tensor) -> Supernet:
    opt = torch.optim.Adam(model.weight_parameters(), lr=0.02)
    model.train()
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _weight_sets(model: Supernet, G: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Distinct mixing weights; the second has an op zeroed, the third an edge (not renormalised,
    as the selection's ablations are)."""
    g = torch.Generator().manual_seed(seed)
    base = model.mixing_weights(model.arch.mu())
    sets = []
    for i in range(G):
        w = [t.detach() * (0.5 + torch.rand(t.shape, generator=g)) for t in base]
        if i == 1:
            w[0][3, 4] = 0.0
        if i == 2:
            w[3][5] = 0.0
        sets.append(tuple(w))
    return sets


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_a_grouped_pass_gives_the_separate_passes_logits(k, training):
    x = torch.rand(10, 1, 8, 8)
    model = _trained(_supernet(k), x, torch.arange(10) % 4)  # running statistics off 0 / 1
    sets = _weight_sets(model, 4, seed=1)
    stacked = tuple(torch.stack(t) for t in zip(*sets))
    with frozen_statistics(model), torch.no_grad():
        model.train(training)
        want = torch.stack([model(x, weights=w) for w in sets])
        got = model(x, weights=stacked)
    assert got.shape == (4, 10, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the groups differ from each other: a pass that ignored the per-group weights would fail
    assert (want[0] - want[1]).abs().max() > 1e-3 and (want[0] - want[2]).abs().max() > 1e-3


def test_grouped_losses_equal_the_per_pass_losses_and_move_no_statistic():
    model = _supernet()
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 4, (12,))
    sets = _weight_sets(model, 3, seed=2)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = [supernet_loss(model, batches, w) for w in sets]
    grouped = supernet_losses(model, batches, tuple(torch.stack(t) for t in zip(*sets)))
    assert grouped == pytest.approx(one, rel=1e-5, abs=1e-6)
    assert len(set(one)) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_reference_forward_refuses_grouped_weights():
    model = Supernet(C=8, num_classes=2, layers=3, in_channels=1, nodes=2, k=2, fused=False)
    w = tuple(t.detach()[None].expand(2, *t.shape) for t in model.mixing_weights(model.arch.mu()))
    with pytest.raises(NotImplementedError, match="fused"):
        model(torch.rand(2, 1, 8, 8), weights=w)


def test_the_grouped_selection_scores_as_one_pass_per_loss():
    model = _supernet(nodes=2)  # 5 edges per cell type
    x, y = torch.rand(48, 1, 8, 8), torch.randint(0, 4, (48,))
    _trained(model, x, y)
    batches = [(x[:16], y[:16])]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {
        grouped: perturbation_select(
            model, batches, model.arch.mu(), estimate="exact", grouped=grouped
        )
        for grouped in (True, False)
    }
    (_, fast), (_, slow) = runs[True], runs[False]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fast.evaluations == slow.evaluations == 1 + 2 * 5 * 7 + 1 + 2 * 5
    assert fast.base_loss == pytest.approx(slow.base_loss, rel=1e-5)
    decided = 0
    for cell in ("normal", "reduce"):
        a, b = fast.ops[cell], slow.ops[cell]
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, equal_nan=True)
        torch.testing.assert_close(fast.edges[cell], slow.edges[cell], rtol=0, atol=2e-5)
        # every op decision whose two best candidates are apart by more than rounding agrees
        for ra, rb in zip(a.nan_to_num(nan=-1e9), b.nan_to_num(nan=-1e9)):
            top = rb.topk(2).values
            if top[0] - top[1] > 1e-4:
                decided += 1
                assert ra.argmax() == rb.argmax()
    assert slow.ops["normal"].abs().nan_to_num().max() > 1e-3  # the ablations move the loss
    assert decided >= 4


def test_grouping_applies_to_exact_unattacked_losses_of_a_fused_supernet_only():
    fused = _supernet()
    plain = Supernet(C=8, num_classes=2, layers=3, in_channels=1, k=2, fused=False)
    b = [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    assert _Scorer(fused, b, "exact", None).grouped
    assert not _Scorer(fused, b, "exact", None, grouped=False).grouped
    assert not _Scorer(fused, b, "first_order", None).grouped
    assert not _Scorer(fused, b, "exact", lambda net, x, y: x).grouped
    assert not _Scorer(plain, b, "exact", None).grouped
