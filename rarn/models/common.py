"""Small model utilities shared by every room: the eval-mode context and the logit margin.

They live with the models (not with the attacks) so that certification, attacks, training and
evaluation can all use them without importing each other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["device_of", "eval_mode", "logit_margin"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and freeze its parameters for the duration of an attack.

    Afterwards every submodule gets back its own ``training`` flag (not just the root's, so a
    model with a deliberately frozen BatchNorm stays as it was) and every parameter its own
    ``requires_grad``. Freezing parameters means the backward pass computes input gradients
    only, which is what makes an attack step cheaper than a training step.

    Args:
        model: the module to switch.

    Yields:
        The same module, in eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample margin ``max_{j != y} z_j - z_y`` (positive: misclassified).

    Args:
        logits: ``(N, K)``.
        y: labels ``(N,)``.

    Returns:
        ``(N,)`` margins.
    """
    onehot = F.one_hot(y, logits.shape[1]).bool()
    return logits.masked_fill(onehot, -math.inf).amax(dim=1) - logits.masked_select(onehot)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
