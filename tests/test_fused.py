"""The fused supernet forward (rarn.nas._fused) computes the per-edge reference
(SearchCell.forward).

Both paths run on deep copies of one supernet in float64, so any difference beyond rounding is a
bug: logits, every parameter gradient (weights and architecture), BN running statistics and
``num_batches_tracked`` after training-mode steps, and the double backward of the input-gradient
norm (RACL's exact gradient-norm term).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rarn.nas import _fused
from rarn.nas._fused import fused_cell_forward
from rarn.nas.supernet import Supernet
from rarn.space.ops import PRIMITIVES, OpDef

RTOL, ATOL = 1e-9, 1e-11  # float64: the two paths only sum in another order


def _pair(C: int, layers: int, k: int, in_channels: int, dtype=torch.float64):
    torch.manual_seed(0)
    ref = Supernet(C=C, layers=layers, k=k, in_channels=in_channels, fused=False).to(dtype)
    with torch.no_grad():  # move the architecture off its near-uniform init
        for p in ref.arch_parameters():
            p.add_(0.5 * torch.randn_like(p))
    fused = copy.deepcopy(ref)
    fused.fused = True
    return ref, fused


def _loss_and_grads(net: Supernet, x, y, seed: int):
    z = net.arch.sample(torch.Generator().manual_seed(seed))
    logits = net(x, z)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    return logits, grads


def _names(net: Supernet) -> list[str]:
    return [n for n, _ in net.named_parameters()]


def _rel_err(a: torch.Tensor, b: torch.Tensor, atol: float) -> float:
    """Max abs difference relative to the tensor's scale (per-tensor, so tiny grads count too)."""
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / (a.abs().max() + atol))


def _assert_close_grads(names, ga, gb, rtol=RTOL, atol=ATOL):
    errs = []
    for name, a, b in zip(names, ga, gb):
        assert (a is None) == (b is None), name
        if a is not None:
            errs.append((_rel_err(a, b, atol), name))
    worst = max(errs)
    assert worst[0] <= rtol, f"gradient of {worst[1]} differs: {worst[0]:.3g}"


def _assert_same_buffers(ref: Supernet, fused: Supernet, rtol=RTOL, atol=1e-12):
    # Running means are ~0 (inputs are BN outputs): an absolute floor, no per-tensor scale.
    errs = [
        (float((a.double() - b.double()).abs().max() - rtol * a.double().abs().max()), name)
        for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers())
    ]
    worst = max(errs)
    assert worst[0] <= atol, f"buffer {worst[1]} differs by {worst[0]:.3g}"


CASES = {
    # (C, layers, K, in_channels, side, batch)
    "digits_8x8_k4": (8, 5, 4, 1, 8, 4),
    "digits_8x8_k1": (8, 5, 1, 1, 8, 4),
    "odd_7x7_k2": (8, 5, 2, 3, 7, 3),
    "cifar_32x32_k4": (8, 5, 4, 3, 32, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference_train_and_eval(case):
    C, layers, k, cin, side, B = CASES[case]
    ref, fused = _pair(C, layers, k, cin)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cin, side, side, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (B,), generator=g)
    # Two training-mode steps: the second forward reads updated weights and running stats.
    for step in range(2):
        la, ga = _loss_and_grads(ref, x, y, seed=step)
        lb, gb = _loss_and_grads(fused, x, y, seed=step)
        torch.testing.assert_close(la, lb, rtol=RTOL, atol=ATOL)
        _assert_close_grads(_names(ref), ga, gb)
        _assert_same_buffers(ref, fused)
        with torch.no_grad():
            for net, grads in ((ref, ga), (fused, gb)):
                for p, gr in zip(net.parameters(), grads):
                    if gr is not None:
                        p.sub_(0.1 * gr)
    ref.eval()
    fused.eval()
    la, ga = _loss_and_grads(ref, x, y, seed=5)
    lb, gb = _loss_and_grads(fused, x, y, seed=5)
    torch.testing.assert_close(la, lb, rtol=RTOL, atol=ATOL)
    _assert_close_grads(_names(ref), ga, gb)
    _assert_same_buffers(ref, fused)  # eval mode leaves the running stats alone


def test_fused_matches_reference_float32():
    ref, fused = _pair(8, 5, 4, 3, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    la, ga = _loss_and_grads(ref, x, y, seed=0)
    lb, gb = _loss_and_grads(fused, x, y, seed=0)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    # BN with batch statistics amplifies float32 rounding in the backward.
    _assert_close_grads(_names(ref), ga, gb, rtol=1e-3, atol=1e-4)
    _assert_same_buffers(ref, fused, rtol=1e-5, atol=1e-6)


def test_fused_double_backward_matches_reference():
    """RACL's exact gradient-norm term differentiates through the input gradient."""
    ref, fused = _pair(8, 3, 4, 1)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=g)
    grads = []
    for net in (ref, fused):
        x = x0.clone().requires_grad_(True)
        z = net.arch.sample(torch.Generator().manual_seed(0))
        per = F.cross_entropy(net(x, z), y, reduction="none")
        (gx,) = torch.autograd.grad(per.sum(), x, create_graph=True)
        loss = per.mean() + 0.1 * gx.flatten(1).norm(dim=1).mean()
        grads.append(torch.autograd.grad(loss, list(net.parameters()), allow_unused=True))
    _assert_close_grads(_names(ref), *grads, rtol=1e-8, atol=1e-10)


def test_fused_reads_live_modules():
    """No parameter copy: loading another state dict or swapping an op module takes effect."""
    ref, fused = _pair(8, 3, 4, 1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    fused.eval()
    ref.eval()
    fused(x)  # builds and caches the plan
    other, _ = _pair(8, 3, 4, 1)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    ref.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    torch.testing.assert_close(fused(x), ref(x), rtol=RTOL, atol=ATOL)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    # Replacing a module invalidates the cached plan.
    for net in (ref, fused):
        old = net.cells[0].edges[0].ops[4][1]
        new = copy.deepcopy(old)
        with torch.no_grad():
            new.weight.mul_(-1.0)
        net.cells[0].edges[0].ops[4][1] = new
    torch.testing.assert_close(fused(x), ref(x), rtol=RTOL, atol=ATOL)


def test_fused_cell_forward_direct_call_reduction_cell():
    ref, _ = _pair(8, 3, 4, 3)
    ref.eval()
    cell = ref.cells[1]  # a reduction cell, inputs: stem (24 channels) and cell 0 (32)
    assert cell.reduction
    g = torch.Generator().manual_seed(4)
    s0 = torch.randn(2, 24, 9, 9, generator=g, dtype=torch.float64)
    s1 = torch.randn(2, 32, 9, 9, generator=g, dtype=torch.float64)
    _, w_r, _, b_r = ref.mixing_weights(ref.arch.mu())
    out = fused_cell_forward(cell, s0, s1, w_r, b_r)
    assert out.shape == (2, 4 * 16, 5, 5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, cell(s0, s1, w_r, b_r), rtol=RTOL, atol=ATOL)


def test_fused_ops_follow_the_registry_kinds():
    """Ops are batched by their registry kind; what the fused path cannot batch fails by name."""
    assert set(_fused._SEP + _fused._DIL + _fused._POOL + _fused._SKIP) | {"none"} == set(
        PRIMITIVES
    )
    with pytest.raises(ValueError, match="op kind 'conv'"):
        OpDef("conv", lambda C, stride, affine: torch.nn.Identity())
    _, fused = _pair(8, 3, 4, 1)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sep = PRIMITIVES.index("sep_conv_3x3")
    fused.cells[0].edges[0].ops[sep] = torch.nn.Identity()
    with pytest.raises(NotImplementedError, match=r"'sep_conv_3x3' \(kind 'sep'\).*fused=False"):
        fused(x)


def test_fused_rejects_an_op_kind_it_cannot_batch(monkeypatch):
    _, fused = _pair(8, 3, 4, 1)
    monkeypatch.setattr(_fused, "_BATCHED", ("none", "pool", "skip", "sep"))
    with pytest.raises(NotImplementedError, match=r"'dil_conv_3x3' \(kind 'dil'\)"):
        fused(torch.randn(2, 1, 8, 8, dtype=torch.float64))
