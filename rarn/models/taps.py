"""Dead taps of a convolution: kernel taps that read only zero padding at every output position.

A dilated convolution on a small feature map can reach past the map everywhere:
``dil_conv_5x5`` (kernel 5, dilation 2, padding 4) on a 2 x 2 map reads real pixels with its
centre tap only; the other 24 taps multiply padding zeros. Dropping those taps, and the padding
only they needed, gives the same output to the bit (the dropped terms are products with zeros).
It is also much faster on CPU, where oneDNN runs a slow kernel for a padding beyond the kernel's
reach: a depthwise 5 x 5 dilation-2 convolution with 32 channels on a 2 x 2 map (batch 76)
took 1.2 ms forward against 0.05 ms for the 3 x 3 one (docs/benchmarks.md). The default
pipeline's networks (8 x 8 digits, two reductions) have such maps in their last cells; the
attack-ready copy (:mod:`rarn.models.inference`) drops these taps.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["crop_conv2d", "live_taps"]


@functools.lru_cache(maxsize=4096)
def live_taps(
    size: int, kernel: int, stride: int, padding: int, dilation: int
) -> tuple[int, int, int]:
    """Along one dimension of length ``size``: the taps ``[lo, hi)`` that read the input at some
    output position, and the padding the kept taps need: ``(lo, hi, padding - lo * dilation)``.

    Only border taps are dropped, and only when the cropped convolution (``F.conv2d``'s
    symmetric padding) has the same output positions, each reading the same pixels with the
    same weights; otherwise the whole kernel, ``(0, kernel, padding)``.
    """
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [
        i
        for i in range(kernel)
        if any(0 <= o * stride - padding + i * dilation < size for o in range(max(out, 0)))
    ]
    whole = (0, kernel, padding)
    if not live or (live[0] == 0 and live[-1] == kernel - 1):
        return whole
    lo, hi = live[0], live[-1] + 1
    pad = padding - lo * dilation  # tap lo + j then reads o * stride - pad + j * dilation
    if pad < 0 or (size + 2 * pad - dilation * (hi - lo - 1) - 1) // stride + 1 != out:
        return whole
    return lo, hi, pad


def crop_conv2d(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[slice, slice] | None:
    """Drop, in place, the dead taps of ``conv`` for inputs of spatial ``size``.

    The weight keeps its ``Parameter`` object (its data becomes the live taps, in the layout it
    had); padding, kernel size and dilation follow (a single tap left along a dimension needs no
    dilation, which lets oneDNN's plain kernels run). The cropped module computes the same
    function on inputs of that size only.

    Returns:
        The kernel slices kept (``weight[:, :, rows, cols]`` of the full weight), or ``None``
        when no tap is dead (or the padding is not plain zeros).
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    (lh, hh, ph), (lw, hw, pw) = (
        live_taps(n, k, s, p, d)
        for n, k, s, p, d in zip(size, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    )
    if (lh, hh, lw, hw) == (0, conv.kernel_size[0], 0, conv.kernel_size[1]):
        return None
    rows, cols = slice(lh, hh), slice(lw, hw)
    w = conv.weight.data
    fmt = (
        torch.channels_last
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        else torch.contiguous_format
    )
    conv.weight.data = w[:, :, rows, cols].contiguous(memory_format=fmt)
    conv.kernel_size, conv.padding = (hh - lh, hw - lw), (ph, pw)
    conv.dilation = tuple(d if n > 1 else 1 for d, n in zip(conv.dilation, conv.kernel_size))
    return rows, cols
