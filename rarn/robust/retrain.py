"""Adversarial retraining of a discrete architecture (RACL spec §4) as one plain function.

:func:`run_retrain` is the whole stage (no Ray): SGD with a cosine or step schedule, gradient
clipping, optional bf16 autocast and channels-last on GPU, complete checkpoints with exact resume,
and robust-overfitting-aware selection (Rice et al. 2020, arXiv:2002.11569): the returned weights
are those with the best robust accuracy on a held-out validation split, and ``selected_by``
records that rule and epoch.

It reads as its stages: :func:`_build` (split, shard, network, optimiser, schedule, generators),
:meth:`RetrainState.load` (resume), :func:`_run_epoch` (train, validate, select),
:meth:`RetrainState.save` (checkpoints) and :func:`_report` (the selected model and its Lipschitz
report). What is fixed for the run is a :class:`_Setup`; what changes is the
:class:`~rarn.robust.retrain_state.RetrainState`. Steps: :mod:`rarn.robust.steps`; the loop:
:mod:`rarn.robust.loop`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, Subset

from rarn.checkpoint import load_state_checked
from rarn.config import RetrainConfig, check, config_to_dict
from rarn.lipschitz.certify import lipschitz_upper_bound, local_lipschitz
from rarn.models.common import enable_cudnn_autotune
from rarn.models.darts import build_network, count_parameters
from rarn.models.inference import folded_copy
from rarn.robust.augment import augmenting
from rarn.robust.loop import (
    EpochCallback,
    check_nonempty,
    evaluate,
    make_scheduler,
    notify,
    to_device,
    train_epoch,
)
from rarn.robust.retrain_state import LAST, RetrainState, cpu_state
from rarn.robust.steps import StepFn, make_step

__all__ = ["RetrainResult", "run_retrain"]

log = logging.getLogger(__name__)


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


FOLDED_ATTACKS: frozenset[str] = frozenset({"pgd", "fast"})
"""Methods whose inner maximisation runs on the network's folded copy with
``retrain.fold_batchnorm`` (an eval-mode attack on the current weights; TRADES's adversary is
not routed through it)."""


def _step_kwargs(
    cfg: RetrainConfig, generator: torch.Generator, attack_model: nn.Module | None = None
) -> dict[str, Any]:
    aux = {"auxiliary_weight": cfg.auxiliary_weight}
    attack = {"eps": cfg.eps, "generator": generator}
    if attack_model is not None and cfg.method in FOLDED_ATTACKS:
        attack["attack_model"] = attack_model
    return {
        "standard": aux,
        "pgd": aux | attack | {"step_size": cfg.step_size, "steps": cfg.steps},
        "trades": aux
        | attack
        | {"step_size": cfg.step_size, "steps": cfg.steps, "beta": cfg.trades_beta},
        "fast": aux | attack,
    }[cfg.method]


# ----------------------------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class _Setup:
    """What stays fixed for a run: config, device, loaders, the training model and step."""

    cfg: RetrainConfig
    device: torch.device
    train_loader: Iterable[tuple[Tensor, Tensor]]
    val_loader: Iterable[tuple[Tensor, Tensor]] | None  # None: no selection split
    train_model: nn.Module  # the network, or its wrapper (DDP) for the training steps only
    step_fn: StepFn
    channels_last: bool


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _RankLoader:
    """One DDP rank's batches: a ``DistributedSampler`` share of the training split.

    Shares are disjoint and of equal size (``drop_last``), so the ranks stay in lockstep; every
    epoch (:meth:`set_epoch`) draws a new permutation of the *whole* split from ``seed`` and the
    epoch alone, so ranks see different samples each epoch and a resumed run the same order.
    """

    def __init__(
        self, dataset: Any, batch_size: int, rank: int, world: int, seed: int, pin: bool = False
    ) -> None:
        self.dataset, self.batch_size, self.pin = dataset, batch_size, pin
        self.sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        from rarn.data import make_loader

        share = Subset(self.dataset, list(self.sampler))  # this epoch's indices, in order
        return iter(make_loader(share, self.batch_size, shuffle=False, pin_memory=self.pin))


def _loaders(
    cfg: RetrainConfig,
    bundle: Any,
    shard: tuple[int, int],
    generator: torch.Generator,
    pin: bool = False,
) -> tuple[Iterable, Iterable | None]:
    """Training loader (this rank's share) and the seeded held-out validation loader (pinned
    batches when ``pin``: training on CUDA)."""
    from rarn.data import make_loader, search_split

    images = getattr(bundle, "retrain", None)  # data.retrain_images=disjoint: not the search's
    images = bundle.train if images is None else images
    if cfg.val_fraction > 0:  # the selection split (Rice et al. 2020)
        train_set, val_set = search_split(images, 1.0 - cfg.val_fraction, cfg.seed)
    else:
        train_set, val_set = images, None
    rank, world = shard
    if world > 1:  # data parallel: this rank's DistributedSampler share, reshuffled per epoch
        train_loader = _RankLoader(train_set, cfg.batch_size, rank, world, cfg.seed, pin)
    else:
        train_loader = make_loader(
            train_set, cfg.batch_size, shuffle=True, generator=generator, pin_memory=pin
        )
    val_loader = None
    if val_set is not None:
        val_loader = make_loader(val_set, cfg.batch_size, shuffle=False, pin_memory=pin)
    check_nonempty(train_loader, "run_retrain")
    return train_loader, val_loader


def _network(cfg: RetrainConfig, bundle: Any, device: torch.device) -> nn.Module:
    """The DARTS network of ``cfg.genotype``, initialised from ``cfg.seed``, on ``device``."""
    with _seeded_cpu_rng(cfg.seed):
        model = build_network(
            cfg.genotype,
            num_classes=bundle.num_classes,
            in_channels=bundle.in_channels,
            C=cfg.init_channels,
            layers=cfg.layers,
            auxiliary=cfg.auxiliary_weight > 0,
            drop_path=cfg.drop_path,
            image_size=bundle.image_size,
        )
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _build(
    cfg: RetrainConfig,
    bundle: Any,
    device: torch.device,
    wrap_model: Callable[[nn.Module], nn.Module] | None,
    shard: tuple[int, int],
) -> tuple[_Setup, RetrainState]:
    """Data, network, optimiser, schedule, step (augmented: ``cfg.augment``) and the seeded
    generators (loader, attack, drop path; augmentation when on)."""
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    train_loader, val_loader = _loaders(cfg, bundle, shard, loader_gen, device.type == "cuda")
    model = _network(cfg, bundle, device)
    train_model = wrap_model(model) if wrap_model is not None else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * len(train_loader), cfg.lr_min)
    generators = {
        "loader": loader_gen,
        "attack": torch.Generator(device=device).manual_seed(cfg.seed + 1),
        "drop_path": torch.Generator(device=device).manual_seed(cfg.seed + 2),
    }
    if cfg.augment != "none":  # only then: checkpoints of runs without it keep resuming
        generators["augment"] = torch.Generator(device=device).manual_seed(cfg.seed + 4)
    if hasattr(model, "drop_path_generator"):
        model.drop_path_generator = generators["drop_path"]
    folded = None  # the attacks' copy: refreshed from the model before every inner maximisation
    if cfg.fold_batchnorm and cfg.method in FOLDED_ATTACKS:
        folded = folded_copy(model, device)
    step_fn = make_step(cfg.method, **_step_kwargs(cfg, generators["attack"], folded))
    step_fn = augmenting(step_fn, cfg.augment, generators.get("augment"))
    channels_last = cfg.channels_last and device.type == "cuda"
    setup = _Setup(cfg, device, train_loader, val_loader, train_model, step_fn, channels_last)
    state = RetrainState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generators=generators,
        config=config_to_dict(cfg),
        device=device,
        best_state=cpu_state(model),
    )
    return setup, state


# ----------------------------------------------------------------------------------------------
# One epoch


def _val_metrics(setup: _Setup, model: nn.Module) -> dict[str, float]:
    """Clean and robust loss and accuracy on the selection split."""
    cfg = setup.cfg
    # Same random starts every epoch, so epochs are compared on equal terms.
    gen = torch.Generator(device=setup.device).manual_seed(cfg.seed + 3)
    # Few-step selection attack: Madry's step rule 2.5 eps / steps still reaches the boundary.
    step_size = 2.5 * cfg.eps / max(cfg.val_steps, 1)
    va = evaluate(
        model,
        setup.val_loader,
        attack="pgd",
        eps=cfg.eps,
        step_size=step_size,
        steps=cfg.val_steps,
        generator=gen,
        bf16=cfg.bf16,
    )
    return {
        "val_loss": va["loss"],
        "val_acc": va["acc"],
        "val_robust_acc": va["robust_acc"],
        "val_robust_loss": va["robust_loss"],
    }


def _run_epoch(setup: _Setup, state: RetrainState, epoch: int) -> tuple[dict[str, float], bool]:
    """Train one epoch, validate, offer it to the selection; returns (metrics, selected)."""
    cfg, model = setup.cfg, state.model
    if hasattr(model, "drop_path_prob"):  # DARTS: linear ramp from 0 to drop_path
        model.drop_path_prob = cfg.drop_path * (epoch - 1) / cfg.epochs
    if isinstance(setup.train_loader, _RankLoader):
        setup.train_loader.set_epoch(epoch)
    t0 = time.perf_counter()
    tr = train_epoch(
        setup.train_model,
        setup.train_loader,
        setup.step_fn,
        state.optimizer,
        scheduler=state.scheduler,
        grad_clip=cfg.grad_clip,
        epoch=epoch,
        bf16=cfg.bf16,
        channels_last=setup.channels_last,
    )
    metrics = {f"train_{k}": v for k, v in tr.items() if k in ("loss", "acc", "grad_norm")}
    metrics |= {"lr": tr["lr"], "epoch": float(epoch)}
    if setup.val_loader is not None:
        metrics |= _val_metrics(setup, model)
        score, rule = metrics["val_robust_acc"], "best_val_robust_acc"
    else:
        score, rule = float(epoch), "last"  # no validation split: keep the last epoch
    metrics["epoch_time_s"] = time.perf_counter() - t0
    return metrics, state.end_epoch(epoch, metrics, score, rule)


# ----------------------------------------------------------------------------------------------
# Report


def _report(setup: _Setup, state: RetrainState) -> RetrainResult:
    """Load the selected weights; report parameters, the certified and a local Lipschitz bound."""
    model, best = state.model, state.best
    load_state_checked(model, {k: v.to(setup.device) for k, v in state.best_state.items()})
    model.eval()
    probe = next(iter(setup.val_loader if setup.val_loader is not None else setup.train_loader))
    x, y = to_device(*probe, setup.device, False)
    final = {
        "params": float(count_parameters(model)),
        "best_epoch": float(best.epoch),
        "log_lipschitz_upper": lipschitz_upper_bound(model),
        "local_lipschitz": local_lipschitz(model, x, y),
    }
    row = next((h for h in state.history if int(h["epoch"]) == best.epoch), {})
    final |= {k: v for k, v in row.items() if k.startswith("val_")}
    return RetrainResult(
        model=model,
        best_state=state.best_state,
        best_epoch=best.epoch,
        best_metric=best.metric,
        selected_by=best.selected_by,
        history=state.history,
        final=final,
    )


def _pick_device(device: str | torch.device | None) -> torch.device:
    """The run's device (CUDA when available); on CUDA, cuDNN autotuning is switched on here,
    once (:func:`rarn.models.common.enable_cudnn_autotune`)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    enable_cudnn_autotune(dev)
    return dev


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
            ``in_channels``, ``image_size``; ``retrain`` when set); ``cfg.val_fraction`` of the
            retraining images (``retrain``, else ``train``) is held out.
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
        shard: ``(rank, world_size)``: this worker trains on its ``DistributedSampler`` share
            of the training split (equal shares, a new shuffle of the whole split every epoch,
            from ``cfg.seed`` and the epoch); validation is not sharded, so every rank selects
            the same epoch.

    Returns:
        The :class:`RetrainResult`; its model carries the selected weights, and ``final``
        reports parameters, the certified log-Lipschitz bound and a local estimate.

    Raises:
        TrainingDiverged: a non-finite loss. CheckpointError: an unusable checkpoint.
    """
    check(cfg)  # every value rule lives in rarn.config (raises ConfigError naming the key)
    setup, state = _build(cfg, data_bundle, _pick_device(device), wrap_model, shard)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and (ckpt_dir / LAST).exists():
        state.load(ckpt_dir)
        log.info("resumed retraining from %s after epoch %d", ckpt_dir, state.epoch)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        metrics, selected = _run_epoch(setup, state, epoch)
        if ckpt_dir is not None:
            state.save(ckpt_dir, best_changed=selected)
        log.info("retrain epoch %d/%d %s", epoch, cfg.epochs, metrics)
        notify(callbacks, epoch, metrics)
    return _report(setup, state)
