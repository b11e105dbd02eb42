"""Discrete evaluation networks from a genotype, human-designed baselines, and Lipschitz reports.

:class:`Network` is the DARTS evaluation network (Liu et al. 2019, arXiv:1806.09055,
``NetworkCIFAR``/``NetworkImageNet``) that RACL (Dong et al., TPAMI 2025, spec §4) retrains with
adversarial training: a stem, ``layers`` cells with reduction cells at 1/3 and 2/3 of the depth,
an optional auxiliary head after the second reduction, drop-path on non-identity ops, global
pooling and a linear classifier. Ops come from the one registry, :func:`rarn.nas.ops.build_op`.

:func:`build_network` resolves a bundled genotype name, a genotype JSON path, a
:class:`~rarn.nas.genotype.Genotype` or a baseline name (:data:`rarn.models.baselines.BASELINES`).

Lipschitz (spec §2.1 Eq. 2-3, §2.3): :func:`lipschitz_upper_bound` is a *certified* l2 upper bound
of the eval-mode logits map ``x -> F(x)``, composed exactly through the cell DAG (node: sum over its
two inputs of op bound x input bound; cell output: concat, ``sqrt(sum of squares)``), not the
looser per-node product of the search. :func:`local_lipschitz` is an empirical *lower* bound of
the same constant from input gradients on data. ``log(local) <= upper`` always holds.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.lipschitz.estimator import bn_log_scale, depthwise_log_bound
from rarn.models.common import eval_mode, logit_margin
from rarn.nas.genotype import GENOTYPES, Genotype, get_genotype
from rarn.nas.ops import FactorizedReduce, ReLUConvBN, Zero, build_op

__all__ = [
    "STEMS",
    "AuxiliaryHead",
    "Cell",
    "Network",
    "build_network",
    "count_parameters",
    "drop_path",
    "lipschitz_upper_bound",
    "local_lipschitz",
    "module_log_lipschitz",
]

STEMS: tuple[str, ...] = ("auto", "cifar", "imagenet")
_IMAGENET_MIN_SIZE = 64  # "auto" picks the two stride-2 ImageNet stems from this side length


def drop_path(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero whole samples of ``x`` with probability ``p`` and rescale the rest by ``1 / (1 - p)``.

    Args:
        x: a batch ``(B, ...)``.
        p: drop probability in [0, 1).
        generator: source of the per-sample Bernoulli draws (on ``x``'s device); torch's global
            RNG when None.

    Returns:
        The batch with dropped samples zeroed (``x`` itself when ``p`` is 0).
    """
    if p <= 0.0:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep, generator=generator)
    return x * mask / keep


class Cell(nn.Module):
    """A discrete DARTS cell: two preprocessed inputs, two ``(op, input)`` edges per node."""

    def __init__(
        self,
        genotype: Genotype,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        if reduction_prev:  # c_{k-2} has twice the resolution of c_{k-1}
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        pairs = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        if reduction and any(i < 2 for i in concat):
            raise ValueError(
                f"reduction cell cannot concatenate its (unreduced) inputs; concat={concat}"
            )
        self.ops = nn.ModuleList(
            build_op(op, C, 2 if reduction and i < 2 else 1, affine=True) for op, i in pairs
        )
        self.indices: tuple[int, ...] = tuple(i for _, i in pairs)
        self.concat: tuple[int, ...] = tuple(concat)
        self.nodes = len(pairs) // 2
        self.multiplier = len(concat)

    def forward(
        self,
        s0: Tensor,
        s1: Tensor,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for j in range(self.nodes):
            node = None
            for k in (2 * j, 2 * j + 1):
                h = self.ops[k](states[self.indices[k]])
                if drop_prob > 0.0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob, generator)
                node = h if node is None else node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)  # (B, multiplier * C, H, W)


class AuxiliaryHead(nn.Module):
    """DARTS auxiliary classifier, made shape-safe for small feature maps.

    DARTS pools 8 x 8 (CIFAR) or 7 x 7 (ImageNet) maps with a 5 x 5 window (stride 3 or 2) to
    2 x 2; here that pool runs only when the map is at least 5 x 5, and an adaptive pool then
    brings any size to 2 x 2 (a no-op on the DARTS sizes), so 1 x 1 and 2 x 2 maps work too.
    """

    def __init__(self, C: int, num_classes: int, pool_stride: int = 3) -> None:
        super().__init__()
        self.pool_stride = pool_stride
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)  # not in place: x is also the next cell's input
        if min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, 5, self.pool_stride, count_include_pad=False)
        x = F.adaptive_avg_pool2d(x, 2)
        return self.classifier(self.features(x).flatten(1))  # (B, num_classes)


class Network(nn.Module):
    """The DARTS evaluation network for a genotype.

    In training mode with ``auxiliary=True`` the forward pass returns ``(logits, aux_logits)``;
    otherwise (and always in eval mode) it returns ``logits`` of shape ``(B, num_classes)``.
    ``drop_path_prob`` and ``drop_path_generator`` are plain attributes that a training loop sets
    (DARTS ramps the probability linearly over the epochs); the generator must live on the
    inputs' device (None: torch's global RNG).

    Args:
        genotype: the cell pair.
        C: initial channels (per node of the first cells).
        num_classes: number of logits.
        layers: number of cells; reductions sit at ``layers // 3`` and ``2 * layers // 3``.
        in_channels: input image channels.
        auxiliary: add the auxiliary head after the second reduction cell.
        drop_path: initial drop-path probability.
        stem: ``cifar`` (3 x 3 conv + BN, ``stem_multiplier * C`` channels) or ``imagenet``
            (two stride-2 stems as DARTS ``NetworkImageNet``; needs an even ``C``).
        stem_multiplier: channel multiplier of the CIFAR stem.
    """

    def __init__(
        self,
        genotype: Genotype,
        *,
        C: int,
        num_classes: int,
        layers: int,
        in_channels: int = 3,
        auxiliary: bool = False,
        drop_path: float = 0.0,
        stem: str = "cifar",
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        if layers < 1 or C < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"need layers, C, num_classes, in_channels >= 1; got {layers}, {C}, "
                f"{num_classes}, {in_channels}"
            )
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must lie in [0, 1), got {drop_path}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {stem!r}; known: cifar, imagenet")
        reduce_at = {layers // 3, 2 * layers // 3}
        # CIFAR stem: FactorizedReduce only ever sees doubled (even) widths; the ImageNet stem
        # halves C and feeds cell 0 through a FactorizedReduce.
        if C % 2 and stem == "imagenet":
            raise ValueError(f"the imagenet stem needs an even C, got {C}")
        self.genotype = genotype
        self.stem_type = stem
        self.drop_path_prob = float(drop_path)
        self.drop_path_generator: torch.Generator | None = None
        self._aux_pos = 2 * layers // 3
        if stem == "cifar":
            C_curr = stem_multiplier * C
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr)
            )
            C_prev_prev, C_prev, C_curr, reduction_prev = C_curr, C_curr, C, False
        else:
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False),  # stem0's output is also cell 0's s0
                nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            C_prev_prev, C_prev, C_curr, reduction_prev = C, C, C, True
        self.cells = nn.ModuleList()
        C_aux = C_prev
        for i in range(layers):
            reduction = i in reduce_at
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self._aux_pos:
                C_aux = C_prev
        self.aux_head = (
            AuxiliaryHead(C_aux, num_classes, 3 if stem == "cifar" else 2) if auxiliary else None
        )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.stem_type == "cifar":
            s0 = s1 = self.stem(x)
        else:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        p = self.drop_path_prob if self.training else 0.0
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, p, self.drop_path_generator)
            if i == self._aux_pos and self.aux_head is not None and self.training:
                aux_logits = self.aux_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))  # (B, num_classes)
        return (logits, aux_logits) if aux_logits is not None else logits


def build_network(
    name_or_genotype: str | Path | Genotype,
    *,
    num_classes: int,
    in_channels: int = 3,
    C: int = 36,
    layers: int = 20,
    auxiliary: bool = False,
    drop_path: float = 0.0,
    image_size: int | None = None,
    stem: str = "auto",
) -> nn.Module:
    """Build a genotype network or a human-designed baseline by name.

    Args:
        name_or_genotype: a :data:`~rarn.nas.genotype.GENOTYPES` key, a path to a genotype JSON
            file, a :class:`~rarn.nas.genotype.Genotype`, or a
            :data:`~rarn.models.baselines.BASELINES` key.
        num_classes: number of logits.
        in_channels: input image channels.
        C: initial channels of a genotype network (ignored by baselines).
        layers: cells of a genotype network (ignored by baselines).
        auxiliary: auxiliary head (genotype networks only).
        drop_path: drop-path probability (genotype networks only).
        image_size: input side length; with ``stem="auto"`` sizes >= 64 get the ImageNet stem.
        stem: ``auto``, ``cifar`` or ``imagenet`` (genotype networks only).

    Returns:
        The network; its forward returns logits ``(B, num_classes)``.

    Raises:
        KeyError: an unknown name (the message lists genotypes and baselines).
    """
    from rarn.models.baselines import BASELINES

    if isinstance(name_or_genotype, str) and name_or_genotype in BASELINES:
        if auxiliary or drop_path > 0:
            raise ValueError(
                f"baseline {name_or_genotype!r} has no auxiliary head or drop-path; "
                "set auxiliary=False and drop_path=0"
            )
        return BASELINES[name_or_genotype](num_classes=num_classes, in_channels=in_channels)
    if isinstance(name_or_genotype, Genotype):
        genotype = name_or_genotype
    else:
        try:
            genotype = get_genotype(str(name_or_genotype))
        except KeyError:
            raise KeyError(
                f"unknown network {str(name_or_genotype)!r}; known genotypes: "
                f"{', '.join(GENOTYPES)}; baselines: {', '.join(BASELINES)}; "
                "or a path to a genotype .json"
            ) from None
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
    if stem == "auto":
        stem = (
            "imagenet" if image_size is not None and image_size >= _IMAGENET_MIN_SIZE else "cifar"
        )
    return Network(
        genotype,
        C=C,
        num_classes=num_classes,
        layers=layers,
        in_channels=in_channels,
        auxiliary=auxiliary,
        drop_path=drop_path,
        stem=stem,
    )


def count_parameters(model: nn.Module, *, include_auxiliary: bool = False) -> int:
    """Number of parameters; the auxiliary head is left out unless asked for (as DARTS reports)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_auxiliary or not name.startswith("aux_head.")
    )


# ----------------------------------------------------------------------------------------------
# Certified Lipschitz upper bound (log space), eval mode (BN from running statistics).


def _lse(values: list[float]) -> float:
    """log(sum(exp(v))) that tolerates -inf entries."""
    m = max(values)
    if m == float("-inf"):
        return m
    return m + math.log(sum(math.exp(v - m) for v in values))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _windows_per_pixel(k: int, stride: int, dilation: int = 1) -> int:
    """Most output windows (along one axis) that one input pixel can fall in."""
    return min(k, math.ceil((dilation * (k - 1) + 1) / stride))


def _log_spectral_norm(w: Tensor, squarings: int = 12) -> float:
    """Certified log upper bound of the largest ``sigma_max`` of the matrices ``w [..., m, n]``.

    ``sigma_max^2 = lambda_max(G)`` for the Gram matrix ``G = W W^T`` (PSD), and
    ``lambda_max <= tr(G^p)^(1/p) <= m^(1/p) lambda_max``; with ``p = 2^12`` the bound is at most
    ``m^(1/8192)`` (0.1 % for m = 1000) above the exact value. ``G^p`` comes from repeated
    squaring with Frobenius normalisation (log-scale tracked), so it is a dozen matmuls: no
    eigensolver, which took seconds on a loaded two-core CPU, and no power iteration, which
    converges from below. A ``1e-9`` margin covers round-off.
    """
    w = w.detach().double()
    if w.shape[-2] > w.shape[-1]:
        w = w.transpose(-1, -2)
    g = w @ w.transpose(-1, -2)  # (..., m, m), PSD
    log_c = torch.zeros(g.shape[:-2], dtype=torch.float64, device=g.device)
    for _ in range(squarings):
        s = torch.linalg.matrix_norm(g).clamp_min(1e-300)  # Frobenius
        g = g / s[..., None, None]
        log_c = 2.0 * (log_c + s.log())  # G^(2^(i+1)) = exp(log_c) * (g @ g)
        g = g @ g
    tr = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)
    log_lam = (log_c + tr.log()) / 2.0**squarings  # log of the bound on sigma_max^2
    return 0.5 * float(log_lam.max()) + 1e-9


def _conv_log_bound(m: nn.Conv2d) -> float:
    """l2 operator-norm bound of a conv: sqrt(windows per pixel) * sigma_max(W reshaped).

    The conv applies ``W`` (``C_out x C_in k k``) to the im2col patches, and each input pixel is
    copied into at most ``windows_h * windows_w`` patches, so the patch map has norm at most the
    square root of that (any zero padding, stride or dilation). ``sigma_max`` is computed
    to within 0.1 % from above (:func:`_log_spectral_norm`), not by power iteration, which
    converges from below. Grouped convs are block diagonal (max over groups); a depthwise
    kernel also has Young's bound ``||w_c||_1``.
    """
    (kh, kw), (sh, sw), (dh, dw) = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    reps = _windows_per_pixel(kh, sh, dh) * _windows_per_pixel(kw, sw, dw)
    w = m.weight.detach().double()
    G = m.groups
    wg = w.reshape(G, w.shape[0] // G, -1)  # (G, C_out / G, C_in / G * kh * kw)
    bound = 0.5 * math.log(reps) + _log_spectral_norm(wg)
    if G == m.in_channels and w.shape[0] == G:  # depthwise
        bound = min(bound, float(depthwise_log_bound(w.float())))
    return bound


def _avg_pool_log_bound(m: nn.AvgPool2d) -> float:
    """Certified bound of an average pool's l2 norm, valid for every map size.

    The pool is linear, but its matrix depends on the map size near the borders
    (``count_include_pad=False`` averages fewer pixels there). For each side ``n < 4k + 4`` the
    bound is the smaller of the matrix's spectral-norm bound and its Schur test
    ``sqrt(max row sum * max column sum)``; at ``n >= 4k + 4`` the border patterns only repeat
    (with period ``stride``), so the Schur test of sizes ``4k + 4 .. 4k + 3 + stride`` covers all
    larger maps. For a 3 x 3 stride-1 pool this gives the ``7/6`` of :mod:`rarn.lipschitz.estimator`
    (large maps), above the exact norms of small maps (at most 1.06 for 3 x 3).
    """
    (k, _), (p, _) = _pair(m.kernel_size), _pair(m.padding)
    s = _pair(m.stride or m.kernel_size)[0]
    return _avg_pool_log_bound_cached(k, s, p, bool(m.ceil_mode), bool(m.count_include_pad))


@functools.lru_cache(maxsize=64)
def _avg_pool_log_bound_cached(k: int, s: int, p: int, ceil_mode: bool, include_pad: bool) -> float:
    def matrix(n: int) -> Tensor:  # (outputs, inputs) of the pool on an n x n map
        eye = torch.eye(n * n, dtype=torch.float64).view(n * n, 1, n, n)
        y = F.avg_pool2d(eye, k, s, p, ceil_mode=ceil_mode, count_include_pad=include_pad)
        return y.flatten(1).T  # column i is the pool of the i-th unit image

    def schur(a: Tensor) -> float:
        return 0.5 * math.log(float(a.abs().sum(0).max()) * float(a.abs().sum(1).max()))

    big = 4 * k + 4
    worst = max(schur(matrix(n)) for n in range(big, big + s))
    for n in range(max(1, k - 2 * p), big):
        a = matrix(n)
        worst = max(worst, min(schur(a), _log_spectral_norm(a)))
    return worst


def _chain(modules: Iterator[nn.Module] | list[nn.Module]) -> float:
    return sum((module_log_lipschitz(m) for m in modules), 0.0)


def _torchvision_bound(m: nn.Module) -> float | None:
    """torchvision baselines: residual blocks (branch + shortcut) and the networks (chains)."""
    if "torchvision" not in sys.modules:  # then m cannot be a torchvision module
        return None
    from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
    from torchvision.models.resnet import BasicBlock, ResNet

    if isinstance(m, ResNet | MobileNetV2):
        # Both forwards run their children in registration order; the global average pool
        # between them (or a child) has l2 norm <= 1.
        return _chain(list(m.children()))
    if isinstance(m, BasicBlock):  # relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))
        branch = _chain([m.conv1, m.bn1, m.conv2, m.bn2])
        short = module_log_lipschitz(m.downsample) if m.downsample is not None else 0.0
        return _lse([branch, short])
    if isinstance(m, InvertedResidual):
        branch = module_log_lipschitz(m.conv)
        return _lse([branch, 0.0]) if m.use_res_connect else branch
    return None


def module_log_lipschitz(m: nn.Module) -> float:
    """Certified log l2-Lipschitz bound of one module in eval mode.

    Per-layer rules are those of :mod:`rarn.lipschitz.estimator` (BN scale from running statistics,
    depthwise ``l1`` kernels, ``ceil(k/s)`` for max pools, Schur test for average pools,
    ``max(sigma_1, sigma_2)`` for FactorizedReduce), with two changes that make the bound
    certified: spectral norms are bounded from above (not estimated from below by power
    iteration), and average pools are bounded over all map sizes.
    Chains (``nn.Sequential`` and networks whose forward is their children in order) add
    log-bounds; residual blocks add bounds (log-sum-exp).

    Raises:
        NotImplementedError: a layer with no rule, so nothing is silently left out.
    """
    from rarn.models.baselines import WideBasicBlock, WideResNet

    if isinstance(m, Network):
        return _network_log_bound(m)
    if isinstance(m, Zero):
        return float("-inf")
    if isinstance(m, FactorizedReduce):
        return max(_conv_log_bound(m.conv_1), _conv_log_bound(m.conv_2)) + module_log_lipschitz(
            m.bn
        )
    if isinstance(m, WideBasicBlock):
        pre = module_log_lipschitz(m.pre)
        branch = module_log_lipschitz(m.branch)
        if m.shortcut is None:  # x + branch(pre(x))
            return _lse([pre + branch, 0.0])
        return pre + _lse([branch, module_log_lipschitz(m.shortcut)])
    tv = _torchvision_bound(m)
    if tv is not None:
        return tv
    if isinstance(m, nn.Sequential | WideResNet):
        return _chain(list(m.children()))
    if isinstance(m, nn.Conv2d):
        return _conv_log_bound(m)
    if isinstance(m, nn.Linear):
        return _log_spectral_norm(m.weight)
    if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
        if m.running_var is None:
            raise NotImplementedError("BatchNorm without running statistics has no fixed bound")
        gamma = m.weight.detach() if m.affine else None
        return float(bn_log_scale(m.running_var.double(), m.eps, gamma))
    if isinstance(m, nn.MaxPool2d):
        (kh, kw), (sh, sw), (dh, dw) = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        # Each input lies in at most reps windows; (max_w x - max_w y)^2 <= sum_w (x - y)^2.
        reps = _windows_per_pixel(kh, sh, dh) * _windows_per_pixel(kw, sw, dw)
        return 0.5 * math.log(reps)
    if isinstance(m, nn.AvgPool2d):
        return _avg_pool_log_bound(m)
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
        return 0.0  # global mean: norm 1 / sqrt(HW) <= 1
    if isinstance(m, nn.ReLU | nn.ReLU6 | nn.Identity | nn.Dropout | nn.Flatten):
        return 0.0
    raise NotImplementedError(f"no certified Lipschitz rule for {type(m).__name__}")


def _cell_log_bound(cell: Cell, l0: float, l1: float) -> float:
    """Bound of a cell's output given the bounds ``l0``, ``l1`` of its inputs (w.r.t. x)."""
    states = [
        l0 + module_log_lipschitz(cell.preprocess0),
        l1 + module_log_lipschitz(cell.preprocess1),
    ]
    for j in range(cell.nodes):
        terms = [
            module_log_lipschitz(cell.ops[k]) + states[cell.indices[k]] for k in (2 * j, 2 * j + 1)
        ]
        states.append(_lse(terms))
    # Concat: ||[f_1; ...; f_m]|| <= sqrt(sum_k Lip(f_k)^2).
    return 0.5 * _lse([2.0 * states[i] for i in cell.concat])


def _network_log_bound(net: Network) -> float:
    if net.stem_type == "cifar":
        s0 = s1 = module_log_lipschitz(net.stem)
    else:
        s0 = module_log_lipschitz(net.stem0)
        s1 = s0 + module_log_lipschitz(net.stem1)
    for cell in net.cells:
        s0, s1 = s1, _cell_log_bound(cell, s0, s1)
    # Global average pooling has norm <= 1; the auxiliary head is not part of the eval output.
    return s1 + module_log_lipschitz(net.classifier)


@torch.no_grad()
def lipschitz_upper_bound(model: nn.Module) -> float:
    """Certified log upper bound of the l2 Lipschitz constant of ``x -> logits`` in eval mode.

    Args:
        model: a :class:`Network` or a baseline from :func:`build_network`; BN layers use their
            running statistics (train the network, or the bound reflects initial statistics).

    Returns:
        ``log`` of the bound (networks reach ``e^50`` and beyond, so only the log is usable).
    """
    return float(module_log_lipschitz(model))


def local_lipschitz(model: nn.Module, x: Tensor, y: Tensor, *, objective: str = "margin") -> float:
    """Empirical local Lipschitz estimate: ``max_i ||grad_x f(x_i)||_2 / sqrt(2)`` over a batch.

    ``f`` is the logit margin ``z_y - max_{j != y} z_j`` (``objective="margin"``) or the
    cross-entropy loss (``"ce"``). Both have gradient norm at most ``sqrt(2)`` with respect to the
    logits, so the value is a *lower* bound of the logits map's l2 Lipschitz constant, directly
    comparable with ``exp(lipschitz_upper_bound(model))``. Computed in eval mode.

    Args:
        model: the network.
        x: inputs ``(B, C, H, W)``.
        y: labels ``(B,)``.
        objective: ``margin`` or ``ce``.

    Returns:
        The estimate (not its log).
    """
    if objective not in ("margin", "ce"):
        raise ValueError(f"unknown objective {objective!r}; known: margin, ce")
    with eval_mode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        z = model(x).float()  # (B, K)
        if objective == "ce":
            f = F.cross_entropy(z, y, reduction="sum")
        else:
            f = -logit_margin(z, y).sum()
        # Eval mode: samples are independent, so the gradient of the sum is per-sample.
        (g,) = torch.autograd.grad(f, x)
    return float(g.flatten(1).norm(dim=1).max()) / math.sqrt(2.0)
