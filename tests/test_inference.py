"""The attack-ready copy (rarn.models.inference) and what the evaluation does with it.

The copy folds eval-mode batch norms into the convolutions before them and runs channels-last on
CPU; it must compute the model's function (logits and input gradients) up to float rounding,
leave the model alone, fall back to the model where the copy would differ, and leave the
evaluation's headline unchanged on a fixed model (issue 20: nothing in the protocol weakens).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from rarn.models.darts import build_network
from rarn.models.inference import FoldedModel, fold_batchnorm, folded_copy
from rarn.robust.evaluation import (
    SuiteSettings,
    evaluate_robustness,
    records_table,
    verify_records,
)
from rarn.space.genotype import Genotype

# every op of the registry but none, in both cells (a reduction edge on each kind too)
_ALL_OPS = (
    ("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 0), ("dil_conv_5x5", 1),
    ("max_pool_3x3", 0), ("avg_pool_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 2),
)  # fmt: skip
GENOTYPE = Genotype(_ALL_OPS, (2, 3, 4, 5), _ALL_OPS, (2, 3, 4, 5))


def _trained_stats_network(in_channels: int = 3, seed: int = 0) -> nn.Module:
    """A small genotype network whose norms hold non-trivial running statistics and affines."""
    torch.manual_seed(seed)
    net = build_network(GENOTYPE, num_classes=10, in_channels=in_channels, C=8, layers=5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.train()
        for _ in range(3):  # running statistics from data, not the initial 0 / 1
            net(torch.rand(16, in_channels, 8, 8))
    return net.eval()


def _logits_and_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), x)
    return out.detach(), g


def test_the_copy_computes_the_models_function_and_leaves_it_alone():
    net = _trained_stats_network()
    net.train()  # a caller's mode and flags must come back as they were
    net.stem[0].weight.requires_grad_(True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    fast = folded_copy(net)
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # every norm after a convolution in a Sequential is folded: all but FactorizedReduce's
    inside = sum(isinstance(m, nn.BatchNorm2d) for m in fast.net.modules())
    assert fast.folded > 0 and fast.folded + inside == norms
    assert not any(p.requires_grad for p in fast.net.parameters())
    x, y = torch.rand(12, 3, 8, 8), torch.randint(0, 10, (12,))
    net.eval()
    want, want_g = _logits_and_input_grad(net, x, y)
    got, got_g = _logits_and_input_grad(fast, x, y)
    assert fast.active is True  # its first call checked it against the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_g, want_g, rtol=1e-3, atol=1e-6)
    assert got_g.is_contiguous()  # FAB reshapes input gradients with .view


def test_only_eval_mode_norms_with_running_statistics_are_folded():
    conv = nn.Conv2d(3, 4, 3)
    seq = nn.Sequential(conv, nn.BatchNorm2d(4))
    assert fold_batchnorm(seq) == 0  # training mode: batch statistics, nothing to fold
    seq.eval()
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert fold_batchnorm(batch_stats.eval()) == 0
    assert fold_batchnorm(seq) == 1 and isinstance(seq[1], nn.Identity)
    assert seq[0] is not conv and seq[0].bias is not None


class _Shuffled(nn.Sequential):
    """A Sequential whose forward uses its convolution's output twice, normalised and not:
    folding would change it."""

    def forward(self, x):
        h = self[0](x)
        return (h + self[1](h)).mean(dim=(2, 3))


class _NeedsNCHW(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)

    def forward(self, x):
        return self.conv(x).view(len(x), -1)[:, :10]  # .view needs NCHW strides


@pytest.mark.parametrize(
    "model", [_Shuffled(nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10)), _NeedsNCHW()]
)
def test_a_copy_that_would_differ_falls_back_to_the_model(model, caplog):
    model.eval()
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 8, 8))  # running statistics away from 0 / 1
    model.eval()
    x = torch.rand(4, 3, 8, 8)
    fast = folded_copy(model)
    with caplog.at_level(logging.WARNING, logger="rarn.models.inference"):
        out = fast(x)
    assert fast.active is False and "not used" in caplog.text
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_baselines_get_a_checked_copy_too():
    net = build_network("resnet18", num_classes=10, in_channels=3).eval()
    fast = folded_copy(net)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)
    assert isinstance(fast, FoldedModel) and fast.active is True


@pytest.fixture(scope="module")
def digits_darts():
    """A genotype network briefly trained on digits (running statistics from data) and 96 test
    images: a fixed model for the before/after comparison."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = build_network(GENOTYPE, num_classes=10, in_channels=1, C=6, layers=3)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # about 0.9 clean accuracy
        order = torch.randperm(1200, generator=g)
        for i in range(0, 1200, 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), x[1500:1596], y[1500:1596]


def test_the_headline_is_the_same_with_and_without_folding(digits_darts):
    """Issue 20: the faster passes buy no change in what the suite reports on a fixed model."""
    model, x, y = digits_darts
    s = SuiteSettings(
        attacks=("fgsm", "pgd", "mim", "cw", {"name": "square", "attack": "square", "steps": 50}),
        eps=0.1, step_size=0.025, steps=5, eps_curve=(0.05, 0.1), batch_size=48, check_n=32,
        black_box_queries=20, adaptive=False,
    )  # fmt: skip
    runs = {
        fold: evaluate_robustness(
            model, (x, y), s, fold_batchnorm=fold, generator=torch.Generator().manual_seed(0)
        )
        for fold in (False, True)
    }
    plain, fast = runs[False], runs[True]
    assert (plain.model_form, fast.model_form) == ("as_given", "bn_folded")
    assert 0.8 < plain.clean_accuracy and 0 < plain.worst_case_accuracy < plain.clean_accuracy
    assert fast.clean_accuracy == plain.clean_accuracy
    # per image: at most one of the 96 decided otherwise by float rounding on the way
    assert int((fast.robust != plain.robust).sum()) <= 1
    for a, acc in plain.robust_accuracy.items():
        assert abs(fast.robust_accuracy[a] - acc) <= 1 / len(y) + 1e-12, a
    assert fast.curve.keys() == plain.curve.keys()
    assert fast.flags == plain.flags
    # the ledger says what the attacks ran on, and reruns its rows on the same
    table = records_table([fast])
    assert set(table.column("model_form").to_pylist()) == {"bn_folded"}
    checks = verify_records(model, x, y, table, list(range(0, table.num_rows, 37)))
    assert checks and all(c.ok for c in checks), [str(c) for c in checks if not c.ok]


# --- adversarial training: the inner maximisation on the refreshed copy -------------------------


def test_refresh_follows_a_model_in_training():
    net = _trained_stats_network()
    fast = folded_copy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(6, 3, 8, 8)
    for _ in range(3):  # weights and running statistics move
        net.train()
        loss = net(torch.rand(16, 3, 8, 8)).logsumexp(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        fast.refresh()
        net.eval()
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)
    # the later refreshes wrote the live taps of convolutions the first call cropped
    assert fast.active is True and fast.cropped > 0


def test_a_pgd_step_on_the_copy_is_the_step_on_the_model():
    from rarn.robust.steps import pgd_step

    net = _trained_stats_network()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    kw = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 3}
    out, start = {}, {k: v.clone() for k, v in net.state_dict().items()}
    for name, copy_ in (("model", None), ("copy", folded_copy(net))):
        net.load_state_dict(start)  # the training pass moved the running statistics
        net.train()
        g = torch.Generator().manual_seed(0)
        out[name] = pgd_step(net, x, y, generator=g, attack_model=copy_, **kw)
    assert net.training  # the step trains in training mode; the attack ran in eval mode
    torch.testing.assert_close(out["copy"].loss, out["model"].loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["copy"].logits, out["model"].logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "fold", "refreshed"),
    [("pgd", True, True), ("fast", True, True), ("pgd", False, False), ("trades", True, False)],
)
def test_retraining_refreshes_the_copy_before_every_inner_maximisation(
    monkeypatch, method, fold, refreshed
):
    import rarn.robust.retrain as retrain
    from rarn.config import DataConfig, RetrainConfig
    from rarn.data import load_dataset

    calls, steps = [], []
    refresh, train_epoch = FoldedModel.refresh, retrain.train_epoch
    monkeypatch.setattr(FoldedModel, "refresh", lambda self: calls.append(1) or refresh(self))

    def counting(*args, **kwargs):
        out = train_epoch(*args, **kwargs)
        steps.append(int(out["steps"]))
        return out

    monkeypatch.setattr(retrain, "train_epoch", counting)
    cfg = RetrainConfig(
        genotype="RACL", epochs=1, batch_size=32, init_channels=4, layers=2, method=method,
        steps=1, step_size=8 / 255, val_fraction=0.25, val_steps=1, fold_batchnorm=fold,
    )  # fmt: skip
    retrain.run_retrain(cfg, load_dataset(DataConfig(name="digits", limit=96, test_limit=8)))
    assert steps and steps[0] > 0
    assert len(calls) == (sum(steps) if refreshed else 0)


def test_the_first_call_check_leaves_every_submodule_mode_as_it_was():
    net = _trained_stats_network()
    net.train()
    net.stem.eval()  # a deliberately frozen part stays frozen
    modes = [m.training for m in net.modules()]
    fast = folded_copy(net)
    fast(torch.rand(2, 3, 8, 8))
    assert fast.active is True
    assert [m.training for m in net.modules()] == modes
