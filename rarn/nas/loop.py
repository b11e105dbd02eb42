"""The RACL search loop (spec Algorithm 1): epochs of interleaved architecture and weight steps of
a :class:`~rarn.nas.search.RACLSearch`, the epoch's metrics, a checkpoint and observers.

:func:`run_search` is a plain function (no Ray) with per-epoch observer callbacks; with a
``checkpoint_dir`` it writes a complete checkpoint after every epoch and resumes from one, and a
resumed search continues exactly where it stopped: the data order depends only on (seed, epoch)
and the lr only on (epoch, epochs), everything else is in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rarn.checkpoint import atomic_write
from rarn.config import ConstraintConfig, SearchConfig
from rarn.models.common import eval_mode, full_precision
from rarn.nas.collapse import CollapseLimits, CollapseReport, cell_log_lipschitz, detect_collapse
from rarn.nas.constraint import log_bound
from rarn.nas.search import CHECKPOINT, GENOTYPE, RACLSearch
from rarn.nas.selection import decode_search
from rarn.robust.loop import Diverged, check_finite
from rarn.space.genotype import Genotype, parametric_share

__all__ = [
    "SearchCallback",
    "SearchData",
    "SearchDiverged",
    "SearchResult",
    "faithful_log_bound",
    "run_search",
    "supernet_pgd_accuracy",
]

log = logging.getLogger(__name__)

# The clean validation pass is eval mode without gradients, where an image's logits do not
# depend on its batch: large batches, since at search shapes a pass costs mostly per-call
# overhead (2,000 D_V images at 16 x 16, 2 threads: 4.4-4.8 s in batches of 64, 2.1-2.9 s in
# batches of 512; docs/benchmarks.md).
_VAL_BATCH = 512


class SearchDiverged(Diverged):
    """A loss or the bound became non-finite: ``SearchDiverged(epoch, step, what, value)``."""

    stage = "search"


class SearchCallback(Protocol):
    """Observer called after every epoch; it must not modify the search."""

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None: ...


@dataclass(frozen=True)
class SearchData:
    """The search split: ``train`` (D_T, weights) and ``val`` (D_V, architecture)."""

    train: Any
    val: Any
    num_classes: int
    in_channels: int

    @classmethod
    def from_bundle(cls, bundle: Any, train_portion: float = 0.5, seed: int = 0) -> SearchData:
        """Split a :class:`rarn.data.DatasetBundle`'s training data into D_T / D_V."""
        from rarn.data import search_split

        d_t, d_v = search_split(bundle.train, train_portion, seed)
        return cls(d_t, d_v, bundle.num_classes, bundle.in_channels)


@dataclass
class SearchResult:
    """The decoded genotype, every decoding, per-epoch metrics and the final genotype's collapse
    report (:mod:`rarn.nas.collapse`)."""

    genotype: Genotype
    genotypes: dict[str, Genotype]
    history: list[dict[str, float]] = field(default_factory=list)
    collapse: CollapseReport | None = None
    reports: dict[str, CollapseReport] = field(default_factory=dict)  # per decoding

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    @property
    def collapsed(self) -> bool:
        return self.collapse is not None and self.collapse.collapsed

    @property
    def collapse_reason(self) -> str:
        """Why the final genotype counts as collapsed (``""``: it does not)."""
        return "" if self.collapse is None else self.collapse.reason


def run_search(
    search: SearchConfig,
    constraint: ConstraintConfig,
    data: SearchData,
    *,
    callbacks: Sequence[SearchCallback | Callable[[int, Mapping[str, float]], None]] = (),
    checkpoint_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> SearchResult:
    """Run (or resume) a RACL search.

    Args:
        search: supernet and optimisation settings.
        constraint: the chance constraint.
        data: D_T / D_V.
        callbacks: observers ``(epoch, metrics)`` called after every epoch (epoch counts from 1).
        checkpoint_dir: when given, a complete checkpoint and the current genotype are written
            after every epoch, and an existing checkpoint there is resumed.
        device: where to train (default CPU).

    Returns:
        The decoded genotype (``search.decode`` rule), all decodings, per-epoch metrics (with
        the ``collapse_*`` signals of each epoch's genotype) and the final genotype's collapse
        report.

    Raises:
        SearchDiverged: a loss or the bound became non-finite.
        rarn.checkpoint.CheckpointError: the checkpoint to resume from is unreadable (a
            ValueError naming the file).
    """
    s = RACLSearch(
        search,
        constraint,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        device=device,
    )
    if checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT).exists():
        s.load(checkpoint_dir)
        log.info("resumed search from %s at epoch %d", checkpoint_dir, s.epoch)
    while s.epoch < search.epochs:
        metrics = _run_epoch(s, data)
        s.end_epoch(metrics)
        rounded = {k: round(v, 4) for k, v in metrics.items()}
        log.info("epoch %d/%d %s", s.epoch, search.epochs, json.dumps(rounded))
        if checkpoint_dir is not None:
            s.save(checkpoint_dir)
        for cb in callbacks:
            cb(s.epoch, dict(metrics))
    sel = decode_search(s, data.val)
    if sel.report.collapsed:
        log.warning("the searched genotype collapsed: %s", sel.report.reason)
    if checkpoint_dir is not None:
        atomic_write(Path(checkpoint_dir) / GENOTYPE, sel.genotype.to_json())
    return SearchResult(sel.genotype, sel.genotypes, s.history, sel.report, sel.reports)


# ----------------------------------------------------------------------------------------------
# One epoch


@dataclass
class _Tally:
    """Running sums of one epoch's step metrics."""

    sums: Counter = field(default_factory=Counter)
    weight_steps: int = 0
    penalty_steps: int = 0  # weight steps with the gradient-norm term
    arch_steps: int = 0
    satisfied: int = 0  # architecture steps with h <= 0
    dual_positive: int = 0  # architecture steps that end with y > 0 (the constraint binds)
    last_arch: dict[str, float] = field(default_factory=dict)


def _run_epoch(s: RACLSearch, data: SearchData) -> dict[str, float]:
    """Epoch ``s.epoch`` (0-based): its steps, then its metrics (every key of the history)."""
    from rarn.data import make_loader

    t0 = time.perf_counter()
    lr, epoch, cfg = s.lr, s.epoch, s.cfg
    stopped = bool(s.history and s.history[-1].get("arch_stopped"))  # resumable: in the history
    tally = _steps(s, data, epoch, arch_allowed=not stopped)
    metrics = {k: tally.sums[k] / tally.weight_steps for k in ("train_loss", "train_acc")}
    if tally.penalty_steps:
        metrics["grad_norm"] = tally.sums["grad_norm"] / tally.penalty_steps
    val = make_loader(
        data.val, max(_VAL_BATCH, 2 * cfg.batch_size), shuffle=False, pin_memory=_pin(s)
    )
    metrics.update(s.evaluate(val))
    metrics.update(_bound_metrics(s, tally))
    metrics["log_lambda_faithful"] = faithful_log_bound(s)
    metrics.update(_robustness(s, data, epoch))
    genotype = s.decode()
    report = _collapse(s, genotype)
    stop = not stopped and _darts_plus_stop(cfg, report, tally, epoch)
    if stop and s.rollback_arch():  # DARTS+: back to the last epoch below the threshold
        genotype = s.decode()
        report = _collapse(s, genotype)
    elif not stopped and tally.arch_steps:
        s.keep_arch()  # the last architecture below the DARTS+ threshold
    metrics.update(report.metrics())
    metrics.update(
        epoch=float(epoch + 1),
        lr=lr,
        parametric_share=parametric_share(genotype),
        arch_steps=float(tally.arch_steps),
        arch_stopped=float(stopped or stop),
        epoch_time=time.perf_counter() - t0,
    )
    return metrics


def faithful_log_bound(s: RACLSearch) -> float:
    """The spec's bound (product over cells, every op, delta-method mean) of the current median
    architecture, whatever the search's own ``constraint`` config says: the one ``ln lambda_F``
    that compares searches of different variants. Advances no power iteration."""
    with torch.no_grad(), full_precision(s.device):
        inputs = s.bound_inputs(1, update=False)
        return float(log_bound(s.model.arch.mu(), inputs, "product", "all"))


def _robustness(s: RACLSearch, data: SearchData, epoch: int) -> dict[str, float]:
    """``val_pgd_acc``: the supernet's PGD accuracy on the first ``robust_eval_n`` images of D_V
    (median architecture, eval mode), on the first, every k-th and the last epoch; the epochs
    between carry the last value, so every report has it (Ray Tune wants its metric in each)."""
    cfg = s.cfg
    if cfg.robust_eval_every == 0:
        return {}
    last = s.history[-1].get("val_pgd_acc") if s.history else None
    due = (epoch + 1) % cfg.robust_eval_every == 0 or epoch + 1 == cfg.epochs
    if last is not None and not due:
        return {"val_pgd_acc": last}
    return {"val_pgd_acc": supernet_pgd_accuracy(s, data.val)}


def supernet_pgd_accuracy(s: RACLSearch, dataset: Any) -> float:
    """PGD-``robust_eval_steps`` accuracy (L-inf ``robust_eval_eps``, step 2.5 eps / steps,
    random start from a generator seeded by the search seed) of the supernet on the first
    ``robust_eval_n`` images of ``dataset``."""
    from rarn.data import make_loader
    from rarn.robust.attacks import get_attack

    cfg, pgd = s.cfg, get_attack("pgd")
    eps, steps = cfg.robust_eval_eps, cfg.robust_eval_steps
    gen = torch.Generator(device=s.device).manual_seed(cfg.seed + 3)
    correct = seen = 0
    for x, y in make_loader(dataset, 2 * cfg.batch_size, shuffle=False):
        x, y = (
            x[: cfg.robust_eval_n - seen].to(s.device),
            y[: cfg.robust_eval_n - seen].to(s.device),
        )
        x_adv = pgd(s.model, x, y, eps=eps, step_size=2.5 * eps / steps, steps=steps, generator=gen)
        with torch.no_grad(), eval_mode(s.model):
            correct += int((s.model(x_adv).argmax(1) == y).sum())
        seen += len(y)
        if seen >= cfg.robust_eval_n:
            break
    return correct / max(seen, 1)


def _collapse(s: RACLSearch, genotype: Genotype) -> CollapseReport:
    return detect_collapse(genotype, cell_log_lipschitz(s.model), CollapseLimits.of(s.cfg))


def _darts_plus_stop(cfg: SearchConfig, report: CollapseReport, t: _Tally, epoch: int) -> bool:
    """DARTS+ early stopping (Liang et al. 2019): after an epoch with architecture steps, freeze
    the architecture once the normal cell's parameter-free share reaches the threshold."""
    share = report.param_free_share["normal"]
    if cfg.arch_stop_param_free <= 0 or t.arch_steps == 0 or share < cfg.arch_stop_param_free:
        return False
    log.info(
        "epoch %d: normal cell %.0f%% parameter-free >= %.0f%%: architecture frozen (DARTS+)",
        epoch + 1,
        100 * share,
        100 * cfg.arch_stop_param_free,
    )
    return True


def _steps(s: RACLSearch, data: SearchData, epoch: int, arch_allowed: bool = True) -> _Tally:
    """The epoch's steps: per D_T batch an architecture step on the next D_V batch (after the
    warm-up, unless the architecture is frozen) and a weight step."""
    from rarn.data import make_loader

    cfg = s.cfg
    # Data order depends only on (seed, epoch): nothing to checkpoint, exact on resume.
    g_t = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 2 * epoch)
    g_v = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 2 * epoch + 1)
    # fixed batch shapes (drop_last) also let cuDNN's autotuner settle once
    kw = {"shuffle": True, "drop_last": True, "pin_memory": _pin(s)}
    train = make_loader(data.train, cfg.batch_size, generator=g_t, **kw)
    val = make_loader(data.val, cfg.batch_size, generator=g_v, **kw)
    per_epoch = (
        len(train) if not cfg.max_steps_per_epoch else min(len(train), cfg.max_steps_per_epoch)
    )
    start, total = arch_start(cfg, per_epoch), cfg.epochs * per_epoch
    t = _Tally()
    for step, ((xt, yt), (xv, yv)) in enumerate(zip(train, _cycle(val))):
        if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
            break
        done = epoch * per_epoch + step  # weight steps before this one
        if arch_allowed and done >= start:
            s.constraint.kappa = ramped_kappa(s.ccfg, done - start, total - start)
            a = s.arch_step(xv, yv)  # the step moves the batch (non-blocking)
            _check_finite(a, ("arch_loss", "mu_F", "sigma_F", "h"), epoch + 1, step)
            t.sums.update({k: v for k, v in a.items() if k not in ("y", "log_lambda_bar")})
            t.arch_steps += 1
            t.satisfied += a["h"] <= 0
            t.dual_positive += a["y"] > 0
            t.last_arch = a
        # the epoch-local step decides the lazy term: resumable, data order is per epoch too
        w = s.weight_step(xt, yt, penalty=step % cfg.grad_norm_every == 0)
        _check_finite(w, ("train_loss",), epoch + 1, step)
        t.sums.update(w)
        t.weight_steps += 1
        t.penalty_steps += "grad_norm" in w
    if t.weight_steps == 0:
        raise ValueError("empty D_T: no training batch (dataset smaller than batch_size?)")
    return t


def arch_start(cfg: SearchConfig, per_epoch: int) -> int:
    """Weight steps before the first architecture step: ``warmup_epochs`` epochs and at least
    ``warmup_min_steps`` steps."""
    return max(cfg.warmup_epochs * per_epoch, cfg.warmup_min_steps)


def ramped_kappa(c: ConstraintConfig, step: int, steps: int) -> float:
    """``kappa`` at architecture step ``step`` of ``steps``: linear from 0 over the first
    ``kappa_ramp`` share of them (the full value at once when ``kappa_ramp`` is 0)."""
    if c.kappa_ramp <= 0:
        return c.kappa
    return c.kappa * min(1.0, (step + 1) / max(1.0, c.kappa_ramp * steps))


def _pin(s: RACLSearch) -> bool:
    """Pinned host batches when the search runs on CUDA (asynchronous copies)."""
    return s.device.type == "cuda"


def _bound_metrics(s: RACLSearch, t: _Tally) -> dict[str, float]:
    """The bound's moments and the constraint's state: epoch means and last values of the
    architecture steps; during the warm-up, the bound of the current weights (no step, no
    threshold)."""
    if t.arch_steps == 0:
        mu_f, sigma_f = s.moments(s.bound_inputs(s.ccfg.power_iterations))
        return {"mu_F": float(mu_f.detach()), "sigma_F": float(sigma_f.detach())}
    n, last = t.arch_steps, t.last_arch
    out = {k: t.sums[k] / n for k in ("mu_F", "sigma_F", "h", "p_satisfied", "val_ce")}
    out.update(
        y=last["y"],
        log_lambda_bar=last["log_lambda_bar"],
        frac_satisfied=t.satisfied / n,
        frac_dual_positive=t.dual_positive / n,
        kappa=s.constraint.kappa,
        mu_F_last=last["mu_F"],
        h_last=last["h"],
    )
    return out


def _check_finite(values: Mapping[str, float], keys: Iterable[str], epoch: int, step: int) -> None:
    """Raise :class:`SearchDiverged` for the first of ``keys`` whose value is not finite."""
    for k in keys:
        check_finite(values[k], epoch=epoch, step=step, what=k, error=SearchDiverged)


def _cycle(loader: Iterable) -> Iterable:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("empty D_V: no validation batch (dataset smaller than batch_size?)")
