"""Small model utilities shared by every room: the eval-mode context, the logit margin and the
device's precision settings (bf16 autocast, float32 regions, cuDNN autotuning).

They live with the models (not with the attacks) so that certification, attacks, training,
the search and evaluation can all use them without importing each other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "autocast",
    "device_of",
    "enable_cudnn_autotune",
    "eval_mode",
    "full_precision",
    "logit_margin",
]


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


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``bf16`` is set, else a no-op.

    CPU runs ignore the flag on purpose: CPU bf16 autocast is slower than float32 for these
    small convolutions on most CPUs and would make CPU tests differ from the reference maths, so
    ``bf16=True`` on CPU is bit-identical to ``bf16=False`` (tested).
    """
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A float32 region inside a possible :func:`autocast` one (autocast disabled).

    For the maths whose precision matters more than its cost: log-sums of the Lipschitz bound,
    normal CDFs of the chance constraint, the architecture distribution's sampling.
    """
    return torch.autocast(device_type=device.type, enabled=False)


def enable_cudnn_autotune(device: torch.device) -> None:
    """``torch.backends.cudnn.benchmark = True`` on a CUDA device (CPU runs untouched).

    A training run feeds the same few input shapes for thousands of steps, so letting cuDNN time
    its convolution algorithms once per shape and keep the fastest pays off after the first
    steps. The price is run-to-run bitwise reproducibility on CUDA, which its default
    (non-deterministic) kernels do not give anyway; CPU runs, and thus the tests, stay exact.
    Process-wide, hence called once where a run's device is chosen.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
