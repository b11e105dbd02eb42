"""Adversarial retraining of a discrete architecture (RACL spec §4): one loop, swappable steps.

:func:`train_epoch` and :func:`evaluate` are written once; only the step function varies
(:data:`STEPS`):

* ``standard``: cross-entropy on clean inputs.
* ``pgd``: Madry et al. 2018 (arXiv:1706.06083) PGD-AT, ``min_W E max_{||d||_inf <= eps}
  CE(F(x + d), y)`` (spec Eq. 1), the inner max by the attack registry (PGD-7, 8/255, 2/255).
* ``trades``: Zhang et al. 2019 (arXiv:1901.08573), ``CE(F(x), y) + beta KL(F(x) || F(x'))`` with
  ``x'`` maximising the KL term.
* ``fast``: Wong et al. 2020 (arXiv:2001.03994) Fast-AT, FGSM from a uniform random start with
  step ``1.25 eps`` (one PGD step).

Inner maximisations run in eval mode with frozen weights (:func:`rarn.attacks.eval_mode`): BN
uses running statistics, drop-path and the auxiliary head are off, and the backward pass computes
input gradients only, so a PGD-k step costs about ``(2k + 3) / 3`` clean steps.

:func:`run_retrain` is the whole stage as a plain function (no Ray): SGD with a cosine or step
schedule, gradient clipping, optional bf16 autocast and channels-last on GPU, complete
checkpoints with exact resume, and robust-overfitting-aware selection (Rice et al. 2020,
arXiv:2002.11569): the returned weights are those with the best robust accuracy on a held-out
validation split, and ``selected_by`` records that rule and epoch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from rarn.attacks import AttackFn, eval_mode, get_attack
from rarn.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint
from rarn.config import RetrainConfig, config_to_dict
from rarn.network import (
    build_network,
    count_parameters,
    lipschitz_upper_bound,
    local_lipschitz,
)

__all__ = [
    "SCHEDULES",
    "STEPS",
    "EpochCallback",
    "RetrainResult",
    "StepFn",
    "StepOutput",
    "TrainingDiverged",
    "evaluate",
    "fast_step",
    "make_scheduler",
    "make_step",
    "pgd_step",
    "run_retrain",
    "standard_step",
    "trades_step",
    "train_epoch",
]

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
_LAST_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "best", "history", "config")


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite; names the epoch and step."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"training diverged at epoch {epoch}, step {step}: loss = {value}")
        self.epoch, self.step, self.value = epoch, step, value

    def __reduce__(self) -> tuple:  # picklable across processes (Ray workers, multiprocessing)
        return type(self), (self.epoch, self.step, self.value)


class StepOutput(NamedTuple):
    """What a step function returns: the loss to minimise and the logits to score."""

    loss: Tensor  # scalar
    logits: Tensor  # (B, K), on the inputs the weights were trained on (adversarial for AT)


StepFn = Callable[[nn.Module, Tensor, Tensor], StepOutput]


class EpochCallback(Protocol):
    """Observer called after every epoch (after the checkpoint is written); it must not modify
    training. Plain callables ``(epoch, metrics) -> None`` are accepted too."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None: ...


# ----------------------------------------------------------------------------------------------
# Step functions


def _ce(out: Tensor | tuple[Tensor, Tensor], y: Tensor, auxiliary_weight: float) -> StepOutput:
    """Cross-entropy of the main logits plus the weighted auxiliary-head term (DARTS)."""
    if isinstance(out, tuple):
        logits, aux = out
        loss = F.cross_entropy(logits, y)
        if auxiliary_weight > 0:
            loss = loss + auxiliary_weight * F.cross_entropy(aux, y)
        return StepOutput(loss, logits)
    return StepOutput(F.cross_entropy(out, y), out)


def _main(out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def standard_step(
    model: nn.Module, x: Tensor, y: Tensor, *, auxiliary_weight: float = 0.0
) -> StepOutput:
    """Clean cross-entropy (the non-adversarial baseline)."""
    return _ce(model(x), y, auxiliary_weight)


def pgd_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 7,
    generator: torch.Generator | None = None,
    attack: str | AttackFn = "pgd",
    auxiliary_weight: float = 0.0,
) -> StepOutput:
    """Madry PGD-AT: cross-entropy on PGD-``steps`` examples from the attack registry.

    Args:
        model: the network (in training mode).
        x: clean inputs in [0, 1].
        y: labels.
        eps: L-inf radius.
        step_size: attack step.
        steps: attack iterations.
        generator: draws the random start (on ``x``'s device).
        attack: registry name or attack function.
        auxiliary_weight: weight of the auxiliary-head loss.

    Returns:
        The loss on the adversarial batch and its logits.
    """
    fn = get_attack(attack) if isinstance(attack, str) else attack
    x_adv = fn(model, x, y, eps=eps, step_size=step_size, steps=steps, generator=generator)
    return _ce(model(x_adv), y, auxiliary_weight)


def fast_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    auxiliary_weight: float = 0.0,
) -> StepOutput:
    """Fast-AT (Wong et al. 2020): one FGSM step of ``1.25 eps`` from a uniform random start.

    This is exactly one PGD step with a random start, so it reuses the registry's ``pgd``.
    ``step_size`` overrides the ``1.25 eps`` step.
    """
    alpha = 1.25 * eps if step_size is None else step_size
    return pgd_step(
        model,
        x,
        y,
        eps=eps,
        step_size=alpha,
        steps=1,
        generator=generator,
        auxiliary_weight=auxiliary_weight,
    )


def _trades_adversary(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None,
) -> Tensor:
    """TRADES inner max: sign-gradient ascent on ``KL(F(x) || F(x'))`` in the eps-ball."""
    if generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            p_nat = F.softmax(model(x).float(), dim=1)
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        x_adv = (x + 0.001 * noise.to(x.device)).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_nat, reduction="sum")
            (g,) = torch.autograd.grad(kl, x_adv)
            x_adv = x_adv.detach() + step_size * g.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 7,
    beta: float = 6.0,
    generator: torch.Generator | None = None,
    auxiliary_weight: float = 0.0,
) -> StepOutput:
    """TRADES: ``CE(F(x), y) + beta * KL(F(x) || F(x_adv))`` (batch mean), KL inner max.

    Returns:
        The loss and the *clean* logits (TRADES trains on both; clean accuracy is reported).
    """
    x_adv = _trades_adversary(
        model, x.detach(), eps=eps, step_size=step_size, steps=steps, generator=generator
    )
    nat = _ce(model(x), y, auxiliary_weight)
    log_p_adv = F.log_softmax(_main(model(x_adv)).float(), dim=1)
    robust = F.kl_div(log_p_adv, F.softmax(nat.logits.float(), dim=1), reduction="batchmean")
    return StepOutput(nat.loss + beta * robust, nat.logits)


STEPS: dict[str, Callable[..., StepOutput]] = {
    "standard": standard_step,
    "pgd": pgd_step,
    "trades": trades_step,
    "fast": fast_step,
}
"""Training-method name -> step function ``(model, x, y, **knobs) -> StepOutput``."""


def make_step(name: str, **kwargs: Any) -> StepFn:
    """A step function from :data:`STEPS` with its knobs bound (unknown knobs raise TypeError).

    Args:
        name: ``standard``, ``pgd``, ``trades`` or ``fast``.
        **kwargs: keyword arguments of that step (``eps``, ``steps``, ``generator``, ...).

    Returns:
        ``step(model, x, y) -> StepOutput``.
    """
    try:
        fn = STEPS[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; known: {', '.join(STEPS)}") from None
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"step {name!r} takes no {unknown}; it takes {list(params)[3:]}")
    return partial(fn, **kwargs)


# ----------------------------------------------------------------------------------------------
# The loop


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _prepare(
    x: Tensor, y: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _check_nonempty(loader: Iterable, what: str) -> None:
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
    _check_nonempty(loader, "train_epoch")
    device = _device_of(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = correct = grad_sum = 0.0
    n = steps = 0
    t0 = time.perf_counter()
    for x, y in loader:
        if max_steps and steps >= max_steps:
            break
        x, y = _prepare(x, y, device, channels_last)
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
    _check_nonempty(loader, "evaluate")
    device = _device_of(model)
    fn = get_attack(attack) if isinstance(attack, str) else attack
    if fn is not None and generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    loss_sum = correct = r_loss_sum = r_correct = 0.0
    n = batches = 0
    with eval_mode(model):
        for x, y in loader:
            if max_batches and batches >= max_batches:
                break
            x, y = _prepare(x, y, device, False)
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


# ----------------------------------------------------------------------------------------------
# The retraining stage


@dataclass
class RetrainResult:
    """Outcome of :func:`run_retrain`; ``model`` holds the selected (best) weights."""

    model: nn.Module
    best_state: dict[str, Tensor]
    best_epoch: int
    best_metric: float
    selected_by: str  # e.g. "best_val_robust_acc@epoch 7"
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)  # params, Lipschitz, best val metrics


def _step_kwargs(cfg: RetrainConfig, generator: torch.Generator) -> dict[str, Any]:
    aux = {"auxiliary_weight": cfg.auxiliary_weight}
    attack = {"eps": cfg.eps, "generator": generator}
    return {
        "standard": aux,
        "pgd": aux | attack | {"step_size": cfg.step_size, "steps": cfg.steps},
        "trades": aux
        | attack
        | {"step_size": cfg.step_size, "steps": cfg.steps, "beta": cfg.trades_beta},
        "fast": aux | attack,
    }[cfg.method]


def _validate(cfg: RetrainConfig) -> None:
    if cfg.method not in STEPS:
        raise KeyError(f"unknown retrain.method {cfg.method!r}; known: {', '.join(STEPS)}")
    if cfg.schedule not in SCHEDULES:
        raise KeyError(f"unknown retrain.schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"retrain.epochs and batch_size must be >= 1, got {cfg.epochs}, {cfg.batch_size}"
        )
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"retrain.val_fraction must lie in [0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction > 0 and cfg.val_steps < 1:
        raise ValueError(f"retrain.val_steps must be >= 1, got {cfg.val_steps}")


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _notify(callbacks: Sequence[Any], epoch: int, metrics: Mapping[str, float]) -> None:
    for cb in callbacks:
        hook = getattr(cb, "on_epoch_end", None)
        (hook or cb)(epoch, metrics)


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def run_retrain(
    cfg: RetrainConfig,
    data_bundle: Any,
    *,
    callbacks: Sequence[EpochCallback | Callable[[int, Mapping[str, float]], None]] = (),
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> RetrainResult:
    """Adversarially retrain ``cfg.genotype`` and keep the best-robust-on-validation weights.

    Args:
        cfg: the retraining section (network, optimiser, schedule, AT method, selection split).
        data_bundle: a :class:`rarn.data.DatasetBundle` (``train``, ``num_classes``,
            ``in_channels``, ``image_size``); ``cfg.val_fraction`` of ``train`` is held out.
        callbacks: observers called as ``on_epoch_end(epoch, metrics)`` (or plain callables)
            after each epoch, with 1-based epochs.
        checkpoint_dir: when given, ``last.pt`` (complete: model, optimizer, scheduler, epoch,
            RNG and generator states, best metric, selection rule, history, config) and
            ``best.pt`` (selected weights) are written after every epoch, each with a ``.sha256``
            record; an existing ``last.pt`` there is resumed exactly.
        device: where to train (None: CUDA when available, else CPU).
        wrap_model: wraps the network for the training steps only (data parallelism, e.g.
            DDP); checkpoints, validation and the Lipschitz report use the unwrapped network,
            which shares its parameters.
        shard: ``(rank, world_size)``: this worker trains on every ``world_size``-th sample of
            the training split, starting at ``rank`` (equal shares); validation is not sharded,
            so every rank selects the same epoch.

    Returns:
        The :class:`RetrainResult`; its model carries the selected weights, and ``final``
        reports parameters, the certified log-Lipschitz bound and a local estimate.

    Raises:
        TrainingDiverged: a non-finite loss. CheckpointError: an unusable checkpoint.
    """
    from rarn.data import make_loader, search_split

    _validate(cfg)
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    on_gpu = dev.type == "cuda"
    # -- data: a seeded held-out validation split for the selection rule (Rice et al. 2020)
    if cfg.val_fraction > 0:
        train_set, val_set = search_split(data_bundle.train, 1.0 - cfg.val_fraction, cfg.seed)
    else:
        train_set, val_set = data_bundle.train, None
    rank, world = shard
    if world > 1:  # data parallel: disjoint, equal-size shares keep the ranks in lockstep
        train_set = Subset(train_set, range(rank, len(train_set) // world * world, world))
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = make_loader(train_set, cfg.batch_size, shuffle=True, generator=loader_gen)
    val_loader = None if val_set is None else make_loader(val_set, cfg.batch_size, shuffle=False)
    _check_nonempty(train_loader, "run_retrain")
    # -- model, optimiser, schedule
    with _seeded_cpu_rng(cfg.seed):
        model = build_network(
            cfg.genotype,
            num_classes=data_bundle.num_classes,
            in_channels=data_bundle.in_channels,
            C=cfg.init_channels,
            layers=cfg.layers,
            auxiliary=cfg.auxiliary_weight > 0,
            drop_path=cfg.drop_path,
            image_size=data_bundle.image_size,
        )
    model.to(dev)
    channels_last = cfg.channels_last and on_gpu
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_model = wrap_model(model) if wrap_model is not None else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * len(train_loader), cfg.lr_min)
    attack_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    drop_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    generators = {"loader": loader_gen, "attack": attack_gen, "drop_path": drop_gen}
    if hasattr(model, "drop_path_generator"):
        model.drop_path_generator = drop_gen
    step_fn = make_step(cfg.method, **_step_kwargs(cfg, attack_gen))
    # Few-step selection attack: Madry's step rule 2.5 eps / steps still reaches the boundary.
    val_step_size = 2.5 * cfg.eps / max(cfg.val_steps, 1)
    cfg_dict = config_to_dict(cfg)
    # -- state, possibly resumed
    start, history = 0, []
    best = {"metric": float("-inf"), "epoch": 0, "selected_by": ""}
    best_state = _cpu_state(model)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and (ckpt_dir / LAST).exists():
        ck = load_checkpoint(ckpt_dir / LAST, kind="retrain", required=_LAST_KEYS)
        if ck["config"] != cfg_dict:
            diff = sorted(k for k in cfg_dict if ck["config"].get(k) != cfg_dict[k])
            raise CheckpointError(f"{ckpt_dir / LAST}: written with a different config ({diff})")
        load_state_checked(model, ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        if on_gpu and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], dev)
        for name, g in generators.items():
            g.set_state(ck["rng"]["generators"][name])
        start, history, best = int(ck["epoch"]), list(ck["history"]), dict(ck["best"])
        if best["epoch"] > 0:
            bk = load_checkpoint(ckpt_dir / BEST, kind="best_model", required=("model", "best"))
            best_state = dict(bk["model"])
        log.info("resumed retraining from %s after epoch %d", ckpt_dir, start)
    # -- epochs
    for epoch in range(start + 1, cfg.epochs + 1):
        if hasattr(model, "drop_path_prob"):  # DARTS: linear ramp from 0 to drop_path
            model.drop_path_prob = cfg.drop_path * (epoch - 1) / cfg.epochs
        t0 = time.perf_counter()
        tr = train_epoch(
            train_model,
            train_loader,
            step_fn,
            optimizer,
            scheduler=scheduler,
            grad_clip=cfg.grad_clip,
            epoch=epoch,
            bf16=cfg.bf16,
            channels_last=channels_last,
        )
        metrics = {f"train_{k}": v for k, v in tr.items() if k in ("loss", "acc", "grad_norm")}
        metrics |= {"lr": tr["lr"], "epoch": float(epoch)}
        if val_loader is not None:
            # Same random starts every epoch, so epochs are compared on equal terms.
            val_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 3)
            va = evaluate(
                model,
                val_loader,
                attack="pgd",
                eps=cfg.eps,
                step_size=val_step_size,
                steps=cfg.val_steps,
                generator=val_gen,
                bf16=cfg.bf16,
            )
            metrics |= {"val_loss": va["loss"], "val_acc": va["acc"]}
            metrics |= {"val_robust_acc": va["robust_acc"], "val_robust_loss": va["robust_loss"]}
            score, rule = va["robust_acc"], "best_val_robust_acc"
        else:
            score, rule = float(epoch), "last"  # no validation split: keep the last epoch
        metrics["epoch_time_s"] = time.perf_counter() - t0
        history.append(metrics)
        improved = score > best["metric"]
        if improved:
            best = {"metric": float(score), "epoch": epoch, "selected_by": f"{rule}@epoch {epoch}"}
            best_state = _cpu_state(model)
        if ckpt_dir is not None:
            if improved:
                save_checkpoint(
                    ckpt_dir / BEST,
                    {"epoch": epoch, "model": best_state, "best": best},
                    kind="best_model",
                )
            rng = {
                "torch": torch.get_rng_state(),
                "generators": {k: g.get_state() for k, g in generators.items()},
            }
            if on_gpu:
                rng["cuda"] = torch.cuda.get_rng_state(dev)
            state = {
                "epoch": epoch,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "best": best,
                "history": history,
                "config": cfg_dict,
            }
            save_checkpoint(ckpt_dir / LAST, state, kind="retrain")
        log.info("retrain epoch %d/%d %s", epoch, cfg.epochs, metrics)
        _notify(callbacks, epoch, metrics)
    # -- the selected model and its Lipschitz report
    load_state_checked(model, {k: v.to(dev) for k, v in best_state.items()})
    model.eval()
    probe = next(iter(val_loader if val_loader is not None else train_loader))
    x, y = _prepare(*probe, dev, False)
    final = {
        "params": float(count_parameters(model)),
        "best_epoch": float(best["epoch"]),
        "log_lipschitz_upper": lipschitz_upper_bound(model),
        "local_lipschitz": local_lipschitz(model, x, y),
    }
    row = next((h for h in history if int(h["epoch"]) == best["epoch"]), {})
    final |= {k: v for k, v in row.items() if k.startswith("val_")}
    return RetrainResult(
        model=model,
        best_state=best_state,
        best_epoch=int(best["epoch"]),
        best_metric=float(best["metric"]),
        selected_by=str(best["selected_by"]),
        history=history,
        final=final,
    )
