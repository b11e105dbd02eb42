"""The DARTS 8-op search space: one op registry shared by the supernet, genotypes and networks.

``OPS`` maps an op name to an :class:`OpDef`: a factory ``(C, stride, affine) -> nn.Module`` and
the op's *kind* (``OP_KINDS``), which is all the rest of the code may know about it: the supernet
follows ``pool`` ops with a BN, ``sep``/``dil`` ops count as parametric, and the fused supernet
forward batches ops by kind (and rejects a kind it cannot batch). ``PRIMITIVES`` is the key
order, which is also the column order of the architecture parameters (spec §2.2). The op modules
follow DARTS (Liu et al. 2019, arXiv:1806.09055): every parametric op is ReLU -> conv(s) -> BN.
Op modules are plain ``nn.Sequential`` compositions where possible so that
:mod:`rarn.lipschitz.estimator` can bound them child by child. A new op goes into ``OPS`` with
the kind whose module structure it has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OPS",
    "OP_KINDS",
    "PARAMETRIC",
    "PRIMITIVES",
    "DilConv",
    "FactorizedReduce",
    "OpDef",
    "OpFactory",
    "ReLUConvBN",
    "SepConv",
    "Zero",
    "build_op",
    "channel_shuffle",
    "ops_of_kind",
]

OpFactory = Callable[[int, int, bool], nn.Module]


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv k x k -> BN."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) k x k -> pointwise 1 x 1 -> BN."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool,
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv blocks with dilation 1; only the first is strided (DARTS)."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool
    ) -> None:
        super().__init__(
            *DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine),
            *DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine),
        )


class Zero(nn.Module):
    """The `none` op: zeros of the (strided) output shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """ReLU -> two 1 x 1 stride-2 convs on pixel grids offset by one -> concat -> BN.

    The two convs read disjoint pixel sets, so the op's Lipschitz constant is
    max(sigma(W1), sigma(W2)) times the BN scale (used by :mod:`rarn.lipschitz.estimator`).
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:]
        # Odd sizes: pad the shifted grid so both convs give ceil(H / 2) outputs.
        if x.shape[2] % 2 or x.shape[3] % 2:
            shifted = F.pad(shifted, (0, x.shape[3] % 2, 0, x.shape[2] % 2))
        if x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
            # torch CPU (oneDNN) corrupts the heap in the weight gradient of a 1 x 1 stride-2
            # convolution with few input channels in channels-last layout ("double free or
            # corruption" / segfault; benchmarks/repro_channels_last_cpu.py): subsample, then
            # the same convolution at stride 1 (identical maths).
            halves = [_conv_1x1_s2(self.conv_1, x), _conv_1x1_s2(self.conv_2, shifted)]
        else:
            halves = [self.conv_1(x), self.conv_2(shifted)]
        return self.bn(torch.cat(halves, dim=1))


def _conv_1x1_s2(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a bias-free 1 x 1 stride-2 ``conv``, as subsampling + a stride-1 conv."""
    sub = x[:, :, ::2, ::2].contiguous(memory_format=torch.channels_last)
    return F.conv2d(sub, conv.weight)


def _skip(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine)


OP_KINDS: tuple[str, ...] = ("none", "pool", "skip", "sep", "dil")
"""``none``: zeros; ``pool``: parameter-free pooling (BN-normalised in the supernet); ``skip``:
identity, :class:`FactorizedReduce` when strided; ``sep``: :class:`SepConv`; ``dil``:
:class:`DilConv`."""


@dataclass(frozen=True)
class OpDef:
    """One registry entry: the op's kind (one of ``OP_KINDS``) and its factory."""

    kind: str
    build: OpFactory

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"op kind {self.kind!r}: use one of {', '.join(OP_KINDS)}")

    def __call__(self, C: int, stride: int, affine: bool) -> nn.Module:
        return self.build(C, stride, affine)


OPS: dict[str, OpDef] = {
    "none": OpDef("none", lambda C, stride, affine: Zero(stride)),
    "max_pool_3x3": OpDef(
        "pool", lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1)
    ),
    "avg_pool_3x3": OpDef(
        "pool",
        lambda C, stride, affine: nn.AvgPool2d(
            3, stride=stride, padding=1, count_include_pad=False
        ),
    ),
    "skip_connect": OpDef("skip", _skip),
    "sep_conv_3x3": OpDef("sep", lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine)),
    "sep_conv_5x5": OpDef("sep", lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine)),
    "dil_conv_3x3": OpDef("dil", lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine)),
    "dil_conv_5x5": OpDef("dil", lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine)),
}
PRIMITIVES: tuple[str, ...] = tuple(OPS)  # the architecture-parameter column order
PARAMETRIC: frozenset[str] = frozenset(p for p in PRIMITIVES if OPS[p].kind in ("sep", "dil"))


def ops_of_kind(kind: str) -> tuple[str, ...]:
    """The registry's ops of ``kind``, in ``PRIMITIVES`` order."""
    return tuple(p for p in PRIMITIVES if OPS[p].kind == kind)


def build_op(name: str, C: int, stride: int, affine: bool = True) -> nn.Module:
    """Instantiate the op ``name`` with ``C`` channels in and out."""
    try:
        factory = OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(PRIMITIVES)}") from None
    return factory(C, stride, affine)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle, used by PC-DARTS after the partial-channel concat."""
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)
