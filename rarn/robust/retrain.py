"""Adversarial retraining of a discrete architecture (RACL spec §4) as one plain function.

:func:`run_retrain` is the whole stage (no Ray): SGD with a cosine or step schedule, gradient
clipping, optional bf16 autocast and channels-last on GPU, complete checkpoints with exact resume,
and robust-overfitting-aware selection (Rice et al. 2020, arXiv:2002.11569): the returned weights
are those with the best robust accuracy on a held-out validation split, and ``selected_by``
records that rule and epoch. Steps: :mod:`rarn.robust.steps`; the loop: :mod:`rarn.robust.loop`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from rarn.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint
from rarn.config import RetrainConfig, config_to_dict
from rarn.lipschitz.certify import lipschitz_upper_bound, local_lipschitz
from rarn.models.darts import build_network, count_parameters
from rarn.robust.loop import (
    SCHEDULES,
    EpochCallback,
    check_nonempty,
    evaluate,
    make_scheduler,
    notify,
    to_device,
    train_epoch,
)
from rarn.robust.steps import STEPS, make_step

__all__ = ["RetrainResult", "run_retrain"]

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
_LAST_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "best", "history", "config")


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
    check_nonempty(train_loader, "run_retrain")
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
        notify(callbacks, epoch, metrics)
    # -- the selected model and its Lipschitz report
    load_state_checked(model, {k: v.to(dev) for k, v in best_state.items()})
    model.eval()
    probe = next(iter(val_loader if val_loader is not None else train_loader))
    x, y = to_device(*probe, dev, False)
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
