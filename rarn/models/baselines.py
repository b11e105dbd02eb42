"""Human-designed baseline networks for the retraining comparison (RACL spec §6.2).

RACL is compared with "efficient human-designed models" (ResNet, WRN, MobileNet families) under
the same adversarial training. Where torchvision has the model it is used, adapted to small
inputs as is standard for CIFAR: ResNet-18 (He et al. 2016) with a 3 x 3 stride-1 first conv and
no max pool; MobileNetV2 (Sandler et al. 2018) with a stride-1 first conv. Wide ResNets
(Zagoruyko & Komodakis 2016, arXiv:1605.07146; the WRN-34-10 of Madry-style AT papers) are not
in torchvision and are defined here. torchvision is imported only when a baseline is built.

:data:`BASELINES` maps a name to a factory ``(num_classes, in_channels) -> nn.Module``;
:func:`rarn.models.darts.build_network` looks names up here. :func:`baseline_sha256` is a named
network's architecture digest, the counterpart of :meth:`rarn.space.genotype.Genotype.sha256`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import Tensor, nn

from rarn.config import RetrainConfig
from rarn.config.rules import choice_error, registry_rule
from rarn.config.variants import random_seed_of
from rarn.space.genotype import GENOTYPES

__all__ = [
    "BASELINES",
    "WideBasicBlock",
    "WideResNet",
    "baseline_sha256",
    "mobilenet_v2",
    "resnet18",
]


def resnet18(*, num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 for small inputs: 3 x 3 stride-1 first conv, no max pool."""
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    return m


def mobilenet_v2(*, num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV2 with a stride-1 first conv (total stride 16)."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    m = tv_mobilenet_v2(weights=None, num_classes=num_classes)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(m.features[0][0].weight, mode="fan_out")
    return m


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: ``x + branch(bn-relu(x))``, or a 1 x 1 conv shortcut of it."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=False))
        self.branch = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        )
        self.shortcut = (
            None if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        o = self.pre(x)
        return self.branch(o) + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Sequential):
    """WRN-depth-k for small inputs: 3 groups of ``(depth - 4) / 6`` wide blocks (16k, 32k, 64k).

    A Sequential, so its forward (and the Lipschitz chain rule) is its children in order.
    """

    def __init__(self, depth: int, widen: int, *, num_classes: int, in_channels: int = 3) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        blocks: list[nn.Module] = []
        for g in range(3):
            for b in range(n):
                c_in = widths[g] if b == 0 else widths[g + 1]
                blocks.append(
                    WideBasicBlock(c_in, widths[g + 1], (1 if g == 0 else 2) if b == 0 else 1)
                )
        super().__init__(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            *blocks,
            nn.BatchNorm2d(widths[3]),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[3], num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


BASELINES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "wrn-16-4": partial(WideResNet, 16, 4),
    "wrn-28-10": partial(WideResNet, 28, 10),
    "wrn-34-10": partial(WideResNet, 34, 10),
}


def baseline_sha256(name: str) -> str:
    """The architecture digest of a named network: sha256 of the canonical JSON
    ``{"network": "<name>"}`` (``json.dumps(..., sort_keys=True)``, as genotypes are hashed).

    A name fixes the architecture up to its build arguments (classes, input channels), which a
    genotype's digest leaves out too; so the lineage tag ``rarn.genotype_sha`` of a retrained
    network means the same for both kinds.

    Raises:
        KeyError: ``name`` is not a :data:`BASELINES` key.
    """
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return hashlib.sha256(json.dumps({"network": name}, sort_keys=True).encode()).hexdigest()


@registry_rule(RetrainConfig)
def _known_networks(r: RetrainConfig) -> None:
    """``retrain.genotype`` and ``retrain.baselines`` name networks that can be built: a bundled
    genotype, a :data:`BASELINES` network, ``searched`` or a genotype file (the genotype), or
    ``random-<seed>`` (a baseline)."""
    g = r.genotype
    is_file = g.endswith(".json") or (bool(g) and Path(g).is_file())
    if g not in GENOTYPES and g not in BASELINES and g != "searched" and not is_file:
        names = [*GENOTYPES, *BASELINES, "searched", "a path to a genotype .json file"]
        raise choice_error("retrain.genotype", g, names)
    for i, name in enumerate(r.baselines):
        if name not in GENOTYPES and name not in BASELINES and random_seed_of(name) is None:
            allowed = [*GENOTYPES, *BASELINES, "random-<seed>"]
            raise choice_error(f"retrain.baselines[{i}]", name, allowed)
