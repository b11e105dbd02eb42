"""Tests of rarn.robust.augment: per-image random crop (pad 4) and flip, batched, reproducible,
against torchvision's functional ops; the config field and where it is on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from rarn.config import ConfigError, RetrainConfig, check, load_config
from rarn.robust.augment import AUGMENTS, CROP_PAD, augmenting, random_crop_flip
from rarn.robust.steps import StepOutput

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int = 64, c: int = 3, side: int = 8) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(1))


def test_each_image_is_a_padded_crop_maybe_flipped_as_torchvision_does_it():
    x = _images()
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    # The same draws, in the documented order, then torchvision image by image.
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 2 * CROP_PAD + 1, (len(x),), generator=g)
    dx = torch.randint(0, 2 * CROP_PAD + 1, (len(x),), generator=g)
    flip = torch.rand(len(x), generator=g) < 0.5
    for i in range(len(x)):
        ref = TF.crop(TF.pad(x[i], [CROP_PAD]), int(dy[i]), int(dx[i]), 8, 8)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref), i
    # Per image, not per batch: many different offsets and both flip states.
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 20 and 0 < int(flip.sum()) < len(x)


def test_reproducible_from_the_generator_and_memory_format_kept():
    x = _images(16)
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    cl = random_crop_flip(x.to(memory_format=torch.channels_last), torch.Generator().manual_seed(3))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, a)
    assert random_crop_flip(x, torch.Generator().manual_seed(0), pad=0).equal(
        random_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    )


def test_augmenting_wraps_the_step():
    seen = []

    def step(model, x, y):
        seen.append(x)
        return StepOutput(x.sum(), x)

    assert augmenting(step, "none", None) is step
    x = _images(4)
    augmenting(step, "crop_flip", torch.Generator().manual_seed(0))(None, x, None)
    assert not torch.equal(seen[-1], x)  # 4 images: some crop is off-centre
    with pytest.raises(ValueError, match="crop_flip"):
        augmenting(step, "crop_flip", None)
    with pytest.raises(ValueError, match="augment"):
        augmenting(step, "mixup", torch.Generator())


def test_config_field_and_where_it_is_on():
    assert AUGMENTS == ("none", "crop_flip")
    assert RetrainConfig().augment == "none"
    with pytest.raises(ConfigError, match="retrain.augment"):
        check(RetrainConfig(augment="mixup"))
    on = {"cifar10.yaml", "cifar10_subset.yaml", "study_cifar10.yaml", "study_cifar10_subset.yaml"}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.retrain.augment == ("crop_flip" if path.name in on else "none"), path.name
