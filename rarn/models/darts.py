"""The DARTS evaluation network: a discrete network built from a genotype, or a baseline by name.

:class:`Network` is the DARTS evaluation network (Liu et al. 2019, arXiv:1806.09055,
``NetworkCIFAR``/``NetworkImageNet``) that RACL (Dong et al., TPAMI 2025, spec §4) retrains with
adversarial training: a stem, ``layers`` cells with reduction cells at 1/3 and 2/3 of the depth,
an optional auxiliary head after the second reduction, drop-path on non-identity ops, global
pooling and a linear classifier. Ops come from the one registry, :func:`rarn.space.ops.build_op`.

:func:`build_network` resolves a bundled genotype name, a genotype JSON path, a
:class:`~rarn.space.genotype.Genotype` or a baseline name (:data:`rarn.models.baselines.BASELINES`).

Its certified Lipschitz bound lives in :mod:`rarn.lipschitz.certify`, which reads this structure;
nothing here imports attacks, training or the Lipschitz rules.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.space.genotype import GENOTYPES, Genotype, get_genotype
from rarn.space.ops import FactorizedReduce, ReLUConvBN, build_op

__all__ = [
    "STEMS",
    "AuxiliaryHead",
    "Cell",
    "Network",
    "build_network",
    "count_parameters",
    "drop_path",
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
        name_or_genotype: a :data:`~rarn.space.genotype.GENOTYPES` key, a path to a genotype JSON
            file, a :class:`~rarn.space.genotype.Genotype`, or a
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
    sizes = {"C": C, "num_classes": num_classes, "layers": layers, "in_channels": in_channels}
    return Network(genotype, **sizes, auxiliary=auxiliary, drop_path=drop_path, stem=stem)


def count_parameters(model: nn.Module, *, include_auxiliary: bool = False) -> int:
    """Number of parameters; the auxiliary head is left out unless asked for (as DARTS reports)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_auxiliary or not name.startswith("aux_head.")
    )
