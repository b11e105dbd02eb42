"""Dead convolution taps (rarn.models.taps) and the attack-ready copy that drops them.

A tap that reads only padding at every output position multiplies zeros: dropping it must give
the same output and input gradient, on every size, stride, dilation and padding, and the copy
must stay right when its input size changes or its model trains.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from rarn.models.darts import build_network
from rarn.models.inference import folded_copy
from rarn.models.taps import crop_conv2d, live_taps
from rarn.space.genotype import Genotype


def test_live_taps_of_the_darts_dilated_convolutions():
    # dil_conv_5x5: kernel 5, dilation 2, padding 4; reaches 4 pixels past each border
    assert live_taps(8, 5, 1, 4, 2) == (0, 5, 4)  # every tap reads the 8 x 8 map somewhere
    assert live_taps(4, 5, 1, 4, 2) == (1, 4, 2)  # the outer taps read padding only
    assert live_taps(2, 5, 1, 4, 2) == (2, 3, 0)  # the centre tap alone: a 1 x 1 convolution
    assert live_taps(2, 3, 1, 2, 2) == (1, 2, 0)  # dil_conv_3x3 on 2 x 2
    assert live_taps(2, 3, 1, 1, 1) == (0, 3, 1)  # sep_conv_3x3 never loses a tap
    assert live_taps(4, 5, 2, 4, 2) == (1, 4, 2)  # strided: output positions 0 and 1 keep theirs


@pytest.mark.parametrize("stride", [1, 2])
def test_a_cropped_convolution_computes_the_same_output_and_gradients(stride):
    g = torch.Generator().manual_seed(0)
    cropped = 0
    for n, k, d in itertools.product(range(1, 8), (1, 3, 5, 7), (1, 2, 3)):
        for p in range(0, d * (k - 1) + 1):
            if (n + 2 * p - d * (k - 1) - 1) // stride + 1 < 1:
                continue
            conv = nn.Conv2d(3, 4, k, stride, p, d, bias=True).double()
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            small = nn.Conv2d(3, 4, k, stride, p, d, bias=True).double()
            small.load_state_dict(conv.state_dict())
            kept = crop_conv2d(small, (n, n))
            x = torch.randn(2, 3, n, n, generator=g, dtype=torch.float64, requires_grad=True)
            want = conv(x)
            (gw,) = torch.autograd.grad(want.square().sum(), x)
            got = small(x)
            (gg,) = torch.autograd.grad(got.square().sum(), x)
            assert got.shape == want.shape, (n, k, d, p)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)
            if kept is not None:
                cropped += 1
                rows, cols = kept
                assert torch.equal(small.weight, conv.weight[:, :, rows, cols])
                assert small.kernel_size[0] < k
    assert cropped > 50  # the grid has many dead-tap cases: the check above saw them


def test_crop_keeps_the_parameter_its_layout_and_refuses_other_padding():
    conv = nn.Conv2d(8, 8, 5, 1, 4, 2, groups=8, bias=False).to(memory_format=torch.channels_last)
    weight = conv.weight
    assert crop_conv2d(conv, (2, 2)) == (slice(2, 3), slice(2, 3))
    assert conv.weight is weight and conv.weight.shape == (8, 1, 1, 1)
    assert (conv.kernel_size, conv.padding, conv.dilation) == ((1, 1), (0, 0), (1, 1))
    wide = nn.Conv2d(8, 16, 5, 1, 4, 2).to(memory_format=torch.channels_last)
    assert crop_conv2d(wide, (4, 4)) is not None
    assert wide.weight.is_contiguous(memory_format=torch.channels_last)
    assert crop_conv2d(nn.Conv2d(3, 3, 3, padding=1), (8, 8)) is None  # nothing dead
    assert (
        crop_conv2d(nn.Conv2d(3, 3, 5, padding=4, dilation=2, padding_mode="reflect"), (2, 2))
        is None
    )


_DILATED = (
    ("dil_conv_5x5", 0), ("dil_conv_3x3", 1), ("dil_conv_5x5", 1), ("sep_conv_3x3", 2),
    ("dil_conv_5x5", 2), ("max_pool_3x3", 0), ("skip_connect", 0), ("dil_conv_3x3", 3),
)  # fmt: skip


def _network() -> nn.Module:
    torch.manual_seed(0)
    g = Genotype(_DILATED, (2, 3, 4, 5), _DILATED, (2, 3, 4, 5))
    net = build_network(g, num_classes=10, in_channels=1, C=8, layers=5)
    with torch.no_grad():
        net.train()
        for _ in range(2):
            net(torch.rand(16, 1, 8, 8))
    return net.eval()


def _logits_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.logsumexp(1).sum(), x)
    return out.detach(), g


def test_the_copy_drops_dead_taps_for_its_input_size_and_takes_them_back_for_another():
    net = _network()
    fast = folded_copy(net)
    x8, x16 = torch.rand(12, 1, 8, 8), torch.rand(12, 1, 16, 16)
    for x in (x8, x8):  # the first call crops (2 x 2 and 4 x 4 maps in the later cells)
        got, gg = _logits_and_grad(fast, x)
        want, gw = _logits_and_grad(net, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gg, gw, rtol=1e-3, atol=1e-6)
    assert fast.active is True and fast.cropped > 0
    whole = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d))
    kept = sum(m.weight.numel() for m in fast.net.modules() if isinstance(m, nn.Conv2d))
    assert kept < whole
    # another input size: the convolutions are whole again, still the model's function
    got, gg = _logits_and_grad(fast, x16)
    want, gw = _logits_and_grad(net, x16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gg, gw, rtol=1e-3, atol=1e-6)
    assert fast.cropped == 0
    assert sum(m.weight.numel() for m in fast.net.modules() if isinstance(m, nn.Conv2d)) == whole
    torch.testing.assert_close(fast(x8), net(x8), rtol=1e-4, atol=1e-5)


def test_dropping_dead_taps_changes_no_logit_of_the_folded_copy():
    """Exactness: the copy with and without cropping gives the same logits to the bit."""
    net = _network()
    x = torch.rand(32, 1, 8, 8)
    fast = folded_copy(net)
    fast(x)
    whole = folded_copy(net)
    whole._crop = lambda x: None  # the same copy, every tap kept
    whole(x)
    assert fast.cropped > 0 and whole.cropped == 0
    with torch.no_grad():
        assert torch.equal(fast(x), whole(x))
