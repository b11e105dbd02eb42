"""The epoch loop shared by search and retraining: one training epoch over any step function,
clean and robust evaluation, the learning-rate schedules, divergence and observer hooks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.models.common import device_of, eval_mode
from rarn.robust.attacks import AttackFn, get_attack
from rarn.robust.steps import StepFn

__all__ = [
    "SCHEDULES",
    "EpochCallback",
    "TrainingDiverged",
    "evaluate",
    "make_scheduler",
    "notify",
    "train_epoch",
]


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite; names the epoch and step."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"training diverged at epoch {epoch}, step {step}: loss = {value}")
        self.epoch, self.step, self.value = epoch, step, value

    def __reduce__(self) -> tuple:  # picklable across processes (Ray workers, multiprocessing)
        return type(self), (self.epoch, self.step, self.value)


class EpochCallback(Protocol):
    """Observer called after every epoch (after the checkpoint is written); it must not modify
    training. Plain callables ``(epoch, metrics) -> None`` are accepted too."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None: ...


def notify(callbacks: Sequence[Any], epoch: int, metrics: Mapping[str, float]) -> None:
    for cb in callbacks:
        hook = getattr(cb, "on_epoch_end", None)
        (hook or cb)(epoch, metrics)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(
    x: Tensor, y: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def check_nonempty(loader: Iterable, what: str) -> None:
    if hasattr(loader, "__len__") and len(loader) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{what}: the loader yields no batches")


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    step_fn: StepFn,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float = 5.0,
    epoch: int = 1,
    bf16: bool = False,
    channels_last: bool = False,
    max_steps: int = 0,
) -> dict[str, float]:
    """One pass over ``loader``: step function, backward, clipping, optimizer (and LR) step.

    Args:
        model: the network; put in training mode here.
        loader: batches ``(x, y)``, x in [0, 1].
        step_fn: ``(model, x, y) -> StepOutput`` (see :func:`make_step`).
        optimizer: the weight optimizer.
        scheduler: stepped after every optimizer step (schedules count iterations).
        grad_clip: max global gradient norm (0: no clipping).
        epoch: 1-based epoch number, for error messages.
        bf16: bf16 autocast (CUDA only; ignored on CPU).
        channels_last: channels-last inputs (CUDA only; convert the model once beforehand).
        max_steps: stop after this many steps (0: the whole loader).

    Returns:
        ``loss`` and ``acc`` (sample means over the epoch, on the step's logits), ``lr`` (after
        the epoch), ``grad_norm`` (mean pre-clipping norm), ``samples``, ``steps``, ``time_s``,
        ``images_per_s``.

    Raises:
        ValueError: the loader is empty.
        TrainingDiverged: a non-finite loss (naming the epoch and step).
    """
    check_nonempty(loader, "train_epoch")
    device = device_of(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = correct = grad_sum = 0.0
    n = steps = 0
    t0 = time.perf_counter()
    for x, y in loader:
        if max_steps and steps >= max_steps:
            break
        x, y = to_device(x, y, device, channels_last)
        with _autocast(device, bf16):
            out = step_fn(model, x, y)
        loss = out.loss.float()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(epoch, steps, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            grad_sum += float(nn.utils.clip_grad_norm_(params, grad_clip))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        B = y.shape[0]
        loss_sum += value * B
        correct += float((out.logits.detach().argmax(dim=1) == y).sum())
        n += B
        steps += 1
    if steps == 0:
        raise ValueError("train_epoch: the loader yields no batches")
    dt = time.perf_counter() - t0
    return {
        "loss": loss_sum / n,
        "acc": correct / n,
        "lr": float(optimizer.param_groups[0]["lr"]),
        "grad_norm": grad_sum / steps if grad_clip > 0 else float("nan"),
        "samples": float(n),
        "steps": float(steps),
        "time_s": dt,
        "images_per_s": n / dt if dt > 0 else float("inf"),
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    attack: str | AttackFn | None = None,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 20,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    max_batches: int = 0,
) -> dict[str, float]:
    """Clean (and, with ``attack``, robust) loss and accuracy in eval mode.

    Robust accuracy is worst-case per sample: a sample counts only if it is classified correctly
    both clean and under the attack, so ``robust_acc <= acc`` always.

    Args:
        model: the network (its train/eval mode is restored afterwards).
        loader: batches ``(x, y)``.
        attack: registry name or attack function (None: clean only).
        eps: attack radius.
        step_size: attack step.
        steps: attack iterations.
        generator: the attack's randomness (None: a generator seeded with 0 on the model's
            device, so repeated evaluations are identical).
        bf16: bf16 autocast (CUDA only).
        max_batches: evaluate only this many batches (0: all).

    Returns:
        ``loss``, ``acc``, ``samples``; plus ``robust_loss``, ``robust_acc`` with an attack.
    """
    check_nonempty(loader, "evaluate")
    device = device_of(model)
    fn = get_attack(attack) if isinstance(attack, str) else attack
    if fn is not None and generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    loss_sum = correct = r_loss_sum = r_correct = 0.0
    n = batches = 0
    with eval_mode(model):
        for x, y in loader:
            if max_batches and batches >= max_batches:
                break
            x, y = to_device(x, y, device, False)
            with torch.no_grad(), _autocast(device, bf16):
                logits = model(x).float()
            ok = logits.argmax(dim=1) == y
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float(ok.sum())
            if fn is not None:
                with _autocast(device, bf16):
                    x_adv = fn(
                        model, x, y, eps=eps, step_size=step_size, steps=steps, generator=generator
                    )
                with torch.no_grad(), _autocast(device, bf16):
                    adv = model(x_adv).float()
                r_loss_sum += float(F.cross_entropy(adv, y, reduction="sum"))
                r_correct += float((ok & (adv.argmax(dim=1) == y)).sum())
            n += y.shape[0]
            batches += 1
    if n == 0:
        raise ValueError("evaluate: the loader yields no batches")
    out = {"loss": loss_sum / n, "acc": correct / n, "samples": float(n)}
    if fn is not None:
        out |= {"robust_loss": r_loss_sum / n, "robust_acc": r_correct / n}
    return out


SCHEDULES: tuple[str, ...] = ("cosine", "step")


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, lr_min: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration LR schedule: ``cosine`` to ``lr_min``, or ``step`` (x0.1 at 50 % and 75 %,
    the piecewise schedule of Rice et al. 2020)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps), eta_min=lr_min
        )
    if schedule == "step":
        milestones = [total_steps // 2, (3 * total_steps) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    raise KeyError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
