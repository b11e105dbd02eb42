"""Tests for rarn.models.darts / rarn.models.baselines: shapes, heads, drop-path, registry,
Lipschitz bounds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rarn.lipschitz.certify import lipschitz_upper_bound, local_lipschitz, module_log_lipschitz
from rarn.models.baselines import BASELINES
from rarn.models.darts import Network, build_network, count_parameters, drop_path
from rarn.space.genotype import GENOTYPES, Genotype
from rarn.space.ops import build_op

SHAPES = [(1, 8), (3, 32)]  # (channels, side): digits and CIFAR


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and scales, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", list(GENOTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_genotype_network_shapes_aux_and_backward(name: str, shape: tuple[int, int]) -> None:
    cin, side = shape
    net = build_network(
        name, num_classes=10, in_channels=cin, C=4, layers=3, auxiliary=True, drop_path=0.2
    )
    assert isinstance(net, Network) and net.stem_type == "cifar"
    x = torch.rand(3, cin, side, side)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (3, 10) and aux.shape == (3, 10)
    (logits.sum() + aux.sum()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    net.eval()
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 10)


def test_imagenet_stem_auto_and_layer_layout() -> None:
    net = build_network("RACL", num_classes=5, C=4, layers=4, image_size=64)
    assert net.stem_type == "imagenet"
    assert [c.reduction for c in net.cells] == [False, True, True, False]
    assert net.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    forced = build_network("RACL", num_classes=5, C=4, layers=2, stem="imagenet")
    assert forced.stem_type == "imagenet"
    with pytest.raises(ValueError, match="even"):
        build_network("RACL", num_classes=5, C=5, layers=2, stem="imagenet")


def test_single_cell_and_aux_on_tiny_maps() -> None:
    # layers=1 and 2: reductions coincide / come first; the aux head sees 4x4 and 2x2 maps.
    for layers in (1, 2):
        net = build_network(
            "DARTS_V2", num_classes=3, in_channels=1, C=3, layers=layers, auxiliary=True
        )
        logits, aux = net.train()(torch.rand(2, 1, 8, 8))
        assert logits.shape == aux.shape == (2, 3)


def test_build_network_inputs(tmp_path) -> None:
    g = GENOTYPES["PC_DARTS"]
    path = tmp_path / "g.json"
    path.write_text(g.to_json())
    a = build_network(str(path), num_classes=10, C=4, layers=2)
    b = build_network(g, num_classes=10, C=4, layers=2)
    assert a.genotype == b.genotype == g
    with pytest.raises(KeyError) as e:
        build_network("nope", num_classes=10)
    assert "RACL" in str(e.value) and "resnet18" in str(e.value)
    with pytest.raises(ValueError, match="auxiliary"):
        build_network("resnet18", num_classes=10, auxiliary=True)
    bad = Genotype(g.normal, g.normal_concat, g.reduce, (0, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="reduction cell"):
        build_network(bad, num_classes=10, C=4, layers=3)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_shapes_and_backward(name: str) -> None:
    net = build_network(name, num_classes=7, in_channels=1)
    x = torch.rand(2, 1, 8, 8)
    net.train()
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 7)
    if name in ("resnet18", "wrn-16-4"):
        assert net.eval()(torch.rand(2, 3, 32, 32).mean(1, keepdim=True)).shape == (2, 7)


def test_count_parameters_and_resnet18_size() -> None:
    net = build_network("RACL", num_classes=10, C=4, layers=3, auxiliary=True)
    with_aux = count_parameters(net, include_auxiliary=True)
    aux = sum(p.numel() for p in net.aux_head.parameters())
    assert count_parameters(net) == with_aux - aux > 0
    # CIFAR ResNet-18: 11.17 M parameters with a 3x3 stem and 10 classes.
    assert count_parameters(build_network("resnet18", num_classes=10)) == 11_173_962


def test_drop_path_per_sample_and_training_only() -> None:
    x = torch.ones(1000, 2, 3, 3)
    y = drop_path(x, 0.3, torch.Generator().manual_seed(0))
    kept = (y.flatten(1) != 0).all(1)
    assert ((y.flatten(1) == 0).all(1) | kept).all()  # whole samples
    assert abs(kept.float().mean().item() - 0.7) < 0.05
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert drop_path(x, 0.0) is x

    net = build_network("RACL", num_classes=10, in_channels=1, C=4, layers=3, drop_path=0.5)
    _randomise_bn(net)
    x = torch.rand(4, 1, 8, 8)
    outs = []
    for seed in (0, 0, 1):
        net.drop_path_generator = torch.Generator().manual_seed(seed)
        outs.append(net.train()(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    net.eval()
    assert torch.equal(net(x), net(x))


# ----------------------------------------------------------------------------------------------
# Lipschitz


def _operator_norm(f, shape: tuple[int, ...], iters: int = 60) -> float:
    """Power iteration on A^T A of a linear map ``f`` via autograd: a lower bound of ||A||."""
    v = F.normalize(
        torch.randn(
            shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        ).flatten(),
        dim=0,
    )
    sigma = 0.0
    for _ in range(iters):
        x = v.view(shape).requires_grad_(True)
        y = f(x)
        (g,) = torch.autograd.grad(y, x, grad_outputs=y)  # A^T A v
        sigma = math.sqrt(float((g.flatten() * v).sum()))
        v = F.normalize(g.flatten().detach(), dim=0)
    return sigma


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=4, kernel_size=5, padding=4, dilation=2, groups=4),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
        dict(in_channels=4, out_channels=3, kernel_size=1, stride=2),
    ],
)
@pytest.mark.parametrize("side", [3, 8])
def test_conv_bound_is_certified(conv: dict, side: int) -> None:
    torch.manual_seed(0)
    m = nn.Conv2d(bias=False, **conv).double()
    exact = _operator_norm(m, (1, conv["in_channels"], side, side))
    assert math.log(exact) <= module_log_lipschitz(m) + 1e-9


@pytest.mark.parametrize("op", ["avg_pool_3x3", "max_pool_3x3"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pool_bounds_are_certified(op: str, stride: int) -> None:
    m = build_op(op, 2, stride)
    bound = module_log_lipschitz(m)
    for side in (2, 3, 4, 7):
        if op == "avg_pool_3x3":
            value = _operator_norm(m, (1, 2, side, side))
        else:  # max pool is not linear: sampled difference quotients
            g = torch.Generator().manual_seed(side)
            a = torch.randn(64, 2, side, side, generator=g, dtype=torch.float64)
            b = a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
            value = (
                ((m(a) - m(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)).max().item()
            )
        assert math.log(value) <= bound + 1e-9, (side, value, math.exp(bound))


@pytest.mark.parametrize("name", list(GENOTYPES))
def test_certified_bound_exceeds_local_estimate(name: str) -> None:
    net = build_network(name, num_classes=10, in_channels=1, C=4, layers=3).double()
    _randomise_bn(net, seed=1)
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    upper = lipschitz_upper_bound(net)
    for objective in ("margin", "ce"):
        local = local_lipschitz(net, x, y, objective=objective)
        assert 0 < local and math.log(local) <= upper
    # Random pairs: difference quotients of the logits never exceed the bound either.
    net.eval()
    d = 1e-4 * torch.randn_like(x)
    ratio = (net(x + d) - net(x)).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert math.log(ratio.max().item()) <= upper
    assert net.training is False


def test_bound_for_baselines_and_unknown_layers() -> None:
    net = build_network("wrn-16-4", num_classes=10, in_channels=1).double()
    _randomise_bn(net)
    x, y = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    assert math.log(local_lipschitz(net, x, y)) <= lipschitz_upper_bound(net)
    resnet = build_network("resnet18", num_classes=10, in_channels=1)
    assert math.isfinite(lipschitz_upper_bound(resnet))
    with pytest.raises(NotImplementedError, match="GELU"):
        module_log_lipschitz(nn.Sequential(nn.Linear(3, 3), nn.GELU()))
    with pytest.raises(ValueError, match="objective"):
        local_lipschitz(net, x, y, objective="kl")
