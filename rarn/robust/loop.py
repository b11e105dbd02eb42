"""The epoch loop shared by the search and retraining (STYLE.md principle 10: write it once).

Both stages train a network one mini-batch at a time and differ only in the step (a training
method from :mod:`rarn.robust.steps`, or the search's bilevel step), so what does not vary lives
here, once:

* :func:`train_epoch`: one pass of step, backward, clipping, optimizer and schedule.
* :func:`evaluate`: clean and worst-case robust loss and accuracy, in eval mode.
* :func:`make_scheduler`: the per-iteration learning-rate schedules (:data:`SCHEDULES`).
* :class:`Diverged` and :func:`check_finite`: one divergence rule, so a NaN loss stops a run with
  the epoch, step and quantity named, whichever stage it happens in (:class:`TrainingDiverged`
  here; the search's own error can subclass :class:`Diverged` too).
* :class:`EpochCallback` and :func:`notify`: observers after each epoch, which never modify it.
* :func:`to_device` and :func:`check_nonempty`: batch placement and the empty-loader error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.config import Schedule
from rarn.models.common import autocast, device_of, eval_mode
from rarn.robust.attacks import AttackFn, get_attack
from rarn.robust.steps import StepFn

__all__ = [
    "SCHEDULES",
    "Diverged",
    "EpochCallback",
    "TrainingDiverged",
    "check_finite",
    "check_nonempty",
    "evaluate",
    "make_scheduler",
    "notify",
    "to_device",
    "train_epoch",
]


# ----------------------------------------------------------------------------------------------
# Divergence and observers


class Diverged(RuntimeError):
    """A monitored quantity became non-finite; names the epoch, step and which quantity.

    Subclasses set :attr:`stage` (the first word of the message). Instances survive pickling
    (Ray workers and trials re-raise them in the driver): they are rebuilt from their fields by
    keyword, so a subclass may reorder its positional arguments.
    """

    stage: ClassVar[str] = "run"

    def __init__(self, epoch: int, step: int, what: str, value: float) -> None:
        super().__init__(f"{self.stage} diverged at epoch {epoch}, step {step}: {what} = {value}")
        self.epoch, self.step, self.what, self.value = epoch, step, what, value

    def __reduce__(self) -> tuple:
        fields = {"epoch": self.epoch, "step": self.step, "what": self.what, "value": self.value}
        return partial(type(self), **fields), ()


class TrainingDiverged(Diverged):
    """The training loss became non-finite (``TrainingDiverged(epoch, step, value)``)."""

    stage = "training"

    def __init__(self, epoch: int, step: int, value: float, what: str = "loss") -> None:
        super().__init__(epoch, step, what, value)


def check_finite(
    value: float,
    *,
    epoch: int,
    step: int,
    what: str = "loss",
    error: type[Diverged] = TrainingDiverged,
) -> None:
    """Raise ``error`` (a :class:`Diverged`) when ``value`` is NaN or infinite.

    The one divergence rule of every loop: a non-finite loss would otherwise poison the weights
    silently and surface epochs later as a meaningless accuracy.
    """
    if not math.isfinite(value):
        raise error(epoch=epoch, step=step, what=what, value=value)


class EpochCallback(Protocol):
    """Observer called after every epoch (after the checkpoint is written); it must not modify
    training. Plain callables ``(epoch, metrics) -> None`` are accepted too."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None: ...


def notify(callbacks: Sequence[Any], epoch: int, metrics: Mapping[str, float]) -> None:
    """Call every observer: its ``on_epoch_end`` when it has one, else the observer itself."""
    for cb in callbacks:
        hook = getattr(cb, "on_epoch_end", None)
        (hook or cb)(epoch, metrics)


# ----------------------------------------------------------------------------------------------
# Batches


def to_device(
    x: Tensor, y: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device``; channels-last inputs on CUDA only (a CPU no-op by design)."""
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _no_batches(what: str) -> ValueError:
    return ValueError(f"{what}: the loader yields no batches")


def check_nonempty(loader: Iterable, what: str) -> None:
    """Fail early, naming ``what``, on a sized loader without batches (an unsized one is
    checked after its pass)."""
    if hasattr(loader, "__len__") and len(loader) == 0:  # type: ignore[arg-type]
        raise _no_batches(what)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


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
        step_fn: ``(model, x, y) -> StepOutput`` (see :func:`rarn.robust.steps.make_step`).
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
        with autocast(device, bf16):
            out = step_fn(model, x, y)
        loss = out.loss.float()
        value = float(loss.detach())
        check_finite(value, epoch=epoch, step=steps)
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
        raise _no_batches("train_epoch")
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


def _logits(model: nn.Module, x: Tensor, device: torch.device, bf16: bool) -> Tensor:
    with torch.no_grad(), autocast(device, bf16):
        return model(x).float()


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
    knobs = {"eps": eps, "step_size": step_size, "steps": steps, "generator": generator}
    loss_sum = correct = r_loss_sum = r_correct = 0.0
    n = batches = 0
    with eval_mode(model):
        for x, y in loader:
            if max_batches and batches >= max_batches:
                break
            x, y = to_device(x, y, device, False)
            logits = _logits(model, x, device, bf16)
            ok = logits.argmax(dim=1) == y
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float(ok.sum())
            if fn is not None:
                with autocast(device, bf16):
                    x_adv = fn(model, x, y, **knobs)
                adv = _logits(model, x_adv, device, bf16)
                r_loss_sum += float(F.cross_entropy(adv, y, reduction="sum"))
                r_correct += float((ok & (adv.argmax(dim=1) == y)).sum())
            n += y.shape[0]
            batches += 1
    if n == 0:
        raise _no_batches("evaluate")
    out = {"loss": loss_sum / n, "acc": correct / n, "samples": float(n)}
    if fn is not None:
        out |= {"robust_loss": r_loss_sum / n, "robust_acc": r_correct / n}
    return out


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules

SCHEDULES: tuple[str, ...] = get_args(Schedule)  # the config's Literal is the one list


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
