"""Data augmentation for adversarial training: random crop and horizontal flip, batched.

The standard CIFAR recipe of the literature (Madry et al. 2018, Rice et al. 2020, DARTS,
AdvRush): pad 4 pixels with zeros, crop back to the original size at a random offset, flip
left-right with probability 1/2. Without it robust overfitting sets in earlier and numbers are
not comparable with the published ones.

Done on the device, on whole batches, with a different crop and flip for every image (torchvision
transforms v2 draw one set of parameters for a whole batch tensor): one gather, no per-image
Python loop. All randomness comes from one ``torch.Generator``, so runs are reproducible and a
resumed run draws exactly what the uninterrupted one would have (its state is checkpointed with
the others).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.config.schema import Augment
from rarn.robust.steps import StepFn, StepOutput

__all__ = ["AUGMENTS", "CROP_PAD", "augmenting", "random_crop_flip"]

AUGMENTS: tuple[str, ...] = get_args(Augment)
"""``retrain.augment`` choices: "none" or "crop_flip"."""

CROP_PAD = 4
"""Zero padding of the random crop (pixels per side), as in the literature on CIFAR-10."""


def random_crop_flip(x: Tensor, generator: torch.Generator, *, pad: int = CROP_PAD) -> Tensor:
    """Each image of ``x`` (N, C, H, W) padded by ``pad`` zeros, cropped back to H x W at a random
    offset, and flipped left-right with probability 1/2; offsets and flips per image.

    Draws, in this order, the row offsets, the column offsets (uniform in ``[0, 2 pad]``) and the
    flips from ``generator`` (on its own device), whatever the device of ``x``.
    """
    n, _, h, w = x.shape
    dev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H) into the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reverses the crop's columns
    padded = F.pad(x, (pad, pad, pad, pad))
    index = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def augmenting(step_fn: StepFn, augment: str, generator: torch.Generator | None) -> StepFn:
    """``step_fn`` with its inputs augmented first (``augment``: a :data:`AUGMENTS` choice).

    The augmentation applies to the clean batch, before the step's attack, as in the literature
    (the attack then perturbs the augmented image). "none" returns ``step_fn`` itself.

    Raises:
        ValueError: an unknown choice, or "crop_flip" without a generator.
    """
    if augment == "none":
        return step_fn
    if augment != "crop_flip" or generator is None:
        raise ValueError(f"augment must be one of {AUGMENTS} (crop_flip with a generator)")

    def step(model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        return step_fn(model, random_crop_flip(x, generator), y)

    return step
