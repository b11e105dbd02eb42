"""Batched kernels of the fused supernet forward (:mod:`rarn.nas._fused`): several edges' convs,
BNs and reductions as one op each, in channels-last layout.

Sub-tensors are taken with ``split`` and strided sub-sampling with a kernel-1 pool, never by
slicing, so that gradients stay channels-last too (a mixed-layout gradient sends BN backward to a
~5x slower kernel).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from rarn.space.ops import FactorizedReduce

__all__ = [
    "batch_norm",
    "depthwise",
    "factorized_reduce",
    "grouped_statistics",
    "groups",
    "nchw",
    "nhwc",
    "pointwise",
    "repeat_blocks",
    "shared_batch_norm",
    "shuffle_node",
    "subsample",
]


_BN_SIGNATURE = inspect.signature(F.batch_norm)


class _GroupedStatistics(TorchFunctionMode):
    """Every training-mode ``F.batch_norm`` normalises each of ``groups`` equal consecutive
    slices of its batch with that slice's own statistics; running statistics are not touched.
    Eval-mode norms (running statistics) are unchanged."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        a = _BN_SIGNATURE.bind(*args, **kwargs).arguments
        if not a.get("training", False):
            return func(*args, **kwargs)
        x, w, b = a["input"], a.get("weight"), a.get("bias")
        # [G, B*H*W, C]: a view of a channels-last batch. Two-pass statistics by batched GEMMs
        # with a 1/n row (var_mean's strided reduction is several times slower on CPU).
        xc = x.movedim(1, -1)
        x3 = xc.reshape(self.groups, -1, x.shape[1])
        avg = x3.new_full((self.groups, 1, x3.shape[1]), 1.0 / x3.shape[1])
        d = x3 - torch.bmm(avg, x3)
        scale = torch.rsqrt(torch.bmm(avg, d * d) + a.get("eps", 1e-5))  # [G, 1, C]
        if w is not None:
            scale = scale * w
        y = torch.addcmul(b, d, scale) if b is not None else d * scale
        return y.view(xc.shape).movedim(-1, 1)


_ACTIVE: list[_GroupedStatistics] = []


@contextmanager
def grouped_statistics(groups: int):
    """Inside, a batch is ``groups`` independent batches of equal size stacked along dim 0 for
    every batch norm with batch statistics (what ``groups`` separate train-mode passes would
    compute, up to float rounding); running statistics are left alone, so use it where they do
    not matter (:func:`rarn.nas.supernet_loss.frozen_statistics`)."""
    mode = _GroupedStatistics(groups)
    _ACTIVE.append(mode)
    try:
        with mode:
            yield
    finally:
        _ACTIVE.pop()


def groups() -> int:
    """The group count of the innermost :func:`grouped_statistics` (1 outside)."""
    return _ACTIVE[-1].groups if _ACTIVE else 1


def nhwc(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> its ``[B, H, W, C]`` view (contiguous for channels-last memory)."""
    return x.permute(0, 2, 3, 1)


def nchw(x: Tensor) -> Tensor:
    """Inverse of :func:`nhwc`."""
    return x.permute(0, 3, 1, 2)


def repeat_blocks(x: Tensor, groups: int, m: int) -> Tensor:
    """``[B, G*c, H, W]`` -> ``[B, G*m*c, H, W]`` channels-last: each block of ``c`` channels
    repeated ``m`` times in place (channel order (g, repeat, ch)), in one copy."""
    y = nhwc(x).unflatten(3, (groups, 1, -1)).expand(-1, -1, -1, -1, m, -1)
    return nchw(y.flatten(3))


def batch_norm(x: Tensor, bns: list[nn.Module], training: bool) -> Tensor:
    """One ``F.batch_norm`` for the BNs ``bns`` whose channels are concatenated in ``x``.

    In training mode the running statistics of every BN are updated exactly as
    ``nn.BatchNorm2d.forward`` would (same kernel on a concatenated copy, copied back).
    """
    bn0 = bns[0]
    weight = bias = None
    if bn0.affine:
        weight = torch.cat([bn.weight for bn in bns])
        bias = torch.cat([bn.bias for bn in bns])
    if not bn0.track_running_stats:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn0.eps)
    mean = torch.cat([bn.running_mean for bn in bns])
    var = torch.cat([bn.running_var for bn in bns])
    if not training:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, bn0.eps)
    if bn0.momentum is None:
        raise NotImplementedError("fused forward needs BatchNorm with a float momentum")
    y = F.batch_norm(x, mean, var, weight, bias, True, bn0.momentum, bn0.eps)
    with torch.no_grad():
        n = bn0.num_features
        torch._foreach_copy_([bn.running_mean for bn in bns], mean.split(n))
        torch._foreach_copy_([bn.running_var for bn in bns], var.split(n))
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return y


def shared_batch_norm(x: Tensor, bns: list[nn.Module], repeats: int) -> Tensor:
    """Training-mode BN(affine=False) of ``x`` (blocks of ``c`` channels) whose output is shared
    by ``repeats`` BNs per block, ``bns`` in (block, repeat) order; updates all their running
    statistics with the batch statistics of their block, as ``nn.BatchNorm2d`` does."""
    bn0 = bns[0]
    if groups() > 1:  # per-group statistics, no running update (grouped_statistics)
        return F.batch_norm(x, None, None, None, None, True, 0.0, bn0.eps)
    y, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, bn0.eps)
    if bn0.track_running_stats:
        if bn0.momentum is None:
            raise NotImplementedError("fused forward needs BatchNorm with a float momentum")
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            # The kernel's biased variance, back from 1 / sqrt(var + eps); nn.BatchNorm2d's
            # running_var takes the unbiased one.
            var = (invstd.pow(-2) - bn0.eps).clamp_min_(0.0) * (n / max(n - 1, 1))
            c = bn0.num_features
            blocks = x.shape[1] // c
            mean = mean.view(blocks, 1, c).expand(-1, repeats, -1).reshape(-1)
            var = var.view(blocks, 1, c).expand(-1, repeats, -1).reshape(-1)
            mom = bn0.momentum
            rm = torch.cat([bn.running_mean for bn in bns]).mul_(1.0 - mom).add_(mean, alpha=mom)
            rv = torch.cat([bn.running_var for bn in bns]).mul_(1.0 - mom).add_(var, alpha=mom)
            torch._foreach_copy_([bn.running_mean for bn in bns], rm.split(c))
            torch._foreach_copy_([bn.running_var for bn in bns], rv.split(c))
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return y


def depthwise(x: Tensor, convs: list[nn.Conv2d], m: int = 1, x_sub: Tensor | None = None) -> Tensor:
    """The depthwise convs ``convs`` (same hyper-parameters, ``c`` channels each) of ``m`` edges
    per block of ``c`` input channels, as one conv with channel multiplier ``m``.

    Args:
        x: ``[B, G*c, H, W]``, ``G`` blocks (sources) of ``c`` channels.
        convs: ``G*m`` convs in (block, edge) order.
        m: edges per block.
        x_sub: ``x[:, :, ::2, ::2]``; a stride-2 dilation-2 conv with even padding reads only that
            sub-grid, so it runs there as a dense stride-1 conv (same sums; oneDNN's strided
            dilated depthwise kernels are several times slower on CPU).

    Returns:
        ``[B, G*c*m, H', W']``, channel order (block, ch, edge).
    """
    c0 = convs[0]
    weight = torch.cat([c.weight for c in convs])  # (block, edge, ch)
    if m > 1:
        G, c = len(convs) // m, c0.weight.shape[0]
        weight = weight.view(G, m, c, *weight.shape[1:]).transpose(1, 2).flatten(0, 2)
    stride, padding, dilation = c0.stride, c0.padding, c0.dilation
    if x_sub is not None and stride == (2, 2) and dilation == (2, 2):
        if padding[0] % 2 == 0 and padding[1] % 2 == 0:
            x, stride, dilation = x_sub, 1, 1
            padding = (padding[0] // 2, padding[1] // 2)
    return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])


def pointwise(x: Tensor, convs: list[nn.Conv2d], m: int = 1) -> Tensor:
    """The 1 x 1 convs ``convs`` (``c`` -> ``c'``, in (block, edge) order) of the output of
    :func:`depthwise` with multiplier ``m``; returns channel order (block, edge, ch')."""
    weight = torch.cat([c.weight for c in convs])  # [G*m*c', c, 1, 1]
    groups = len(convs) // m
    if m > 1:
        # Input channel (ch, t) of block s feeds edge t only: weight (x) [t == t'].
        c_out, c = convs[0].weight.shape[:2]
        eye = torch.eye(m, dtype=weight.dtype, device=weight.device)
        weight = torch.einsum("suab,ut->suabt", weight.view(groups, m, c_out, c), eye)
        weight = weight.reshape(groups * m * c_out, c * m, 1, 1)
    return F.conv2d(x, weight, None, 1, 0, 1, groups)


def subsample(x: Tensor) -> Tensor:
    """``x[:, :, ::2, ::2]`` as a kernel-1 stride-2 average pool: the same values, but its backward
    keeps the channels-last layout (slicing's backward allocates a default-layout zero tensor, and
    mixed layouts send BN and ReLU backward to slow kernels)."""
    return F.avg_pool2d(x, 1, 2)


def factorized_reduce(
    r: Tensor, r_sub: Tensor, S: int, frs: list[FactorizedReduce], training: bool
) -> Tensor:
    """Batched :class:`FactorizedReduce` of the ReLU'd partial channels ``r`` of ``S`` sources.

    Args:
        r: ``[B, S*c, H, W]``.
        r_sub: ``subsample(r)``, what every edge's ``conv_1`` reads.
        S: number of sources.
        frs: the edges' modules, in (source, target) order.
        training: BN mode.

    Returns:
        ``[B, S*m*c, H', W']`` in edge order.
    """
    H, W = r.shape[2], r.shape[3]
    E = len(frs)
    # conv_2 reads x[:, :, 1:, 1:], zero-padded to even size, at stride 2.
    shifted = subsample(F.pad(r, (-1, W % 2, -1, H % 2)))
    y1 = F.conv2d(r_sub, torch.cat([fr.conv_1.weight for fr in frs]), None, 1, 0, 1, S)
    y2 = F.conv2d(shifted, torch.cat([fr.conv_2.weight for fr in frs]), None, 1, 0, 1, S)
    # Per edge cat([conv_1, conv_2]): channel order (e, half, ch).
    y = torch.cat([nhwc(y1).unflatten(3, (E, 1, -1)), nhwc(y2).unflatten(3, (E, 1, -1))], dim=4)
    return batch_norm(nchw(y.flatten(3)), [fr.bn for fr in frs], training)


def shuffle_node(a: Tensor, b: Tensor | None, k: int) -> Tensor:
    """``channel_shuffle(cat([a, b]), k)`` in one copy, channels-last.

    Args:
        a: the mixed part ``[B, c, H, W]``.
        b: the bypass part as ``[B, H, W, (k - 1) * c]``, or ``None`` when ``k == 1``.
        k: PC-DARTS K.
    """
    if b is None:
        return a
    c = a.shape[1]
    # Shuffled channel i*k + q holds channel q*c + i of cat([a, b]).
    y = torch.cat([nhwc(a).unsqueeze(4), b.unflatten(3, (k - 1, c)).transpose(3, 4)], dim=4)
    return nchw(y.flatten(3))
