"""The RACL search object (spec §2.7, Algorithm 1): one weight step on D_T, one constrained
architecture step on D_V, and the complete state a resumed search needs. The epoch loop around
it is :func:`rarn.nas.loop.run_search`.

* Weight step (SGD, cosine lr per epoch, grad clipping): ``CE + gamma * E_x ||grad_x CE||_2`` on
  a fresh sample of the architecture; the gradient-norm term is exact (double backprop) or a
  finite difference along the input-gradient direction with the clean pass's kinks frozen, whose
  weight gradient agrees with the exact one (:mod:`rarn.nas.gradnorm`).
* Architecture step (Adam on ``(mu, log sigma)``; weight decay on ``mu`` only, since decay on
  ``log sigma`` drags sigma towards 1, spec §12): validation CE on a reparameterised sample plus
  the augmented-Lagrangian term of the chance constraint on ``(mu_F, sigma_F)``, the two
  gradients balanced (:mod:`rarn.nas.balance`), then dual ascent.
  The per-op Lipschitz constants are detached (the paper constrains architecture parameters).
* ``SearchConfig.bf16``: bf16 autocast of the network's passes on CUDA, except the
  finite-difference gradient-norm pass (its quotient divides rounding by ``fd_step``); bound,
  chance constraint and architecture distribution stay float32 (log-sums, normal CDFs).
* The checkpoint (weights, distributions, optimisers, dual state, power-iteration buffers, RNG
  state) is a :func:`rarn.checkpoint.save_checkpoint` file of kind ``search``, sha256-recorded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_state_checked,
    save_checkpoint,
)
from rarn.config import ConstraintConfig, SearchConfig, check
from rarn.lipschitz.estimator import LipschitzEstimator
from rarn.models.common import autocast, enable_cudnn_autotune, full_precision
from rarn.nas.balance import ArchDiagnostics, arch_gradients, confidence_share
from rarn.nas.constraint import (
    ESTIMATORS,
    BoundInputs,
    ChanceConstraint,
    delta_moments,
    satisfaction_probability,
)
from rarn.nas.decode import MAGNITUDE_DECODERS, decode
from rarn.nas.gradnorm import weight_gradients
from rarn.nas.supernet import ArchSample, Supernet
from rarn.robust.loop import evaluate as evaluate_model
from rarn.robust.loop import make_scheduler
from rarn.space.genotype import Genotype

__all__ = ["CHECKPOINT", "GENOTYPE", "RACLSearch"]

CHECKPOINT = "checkpoint.pt"  # written by RACLSearch.save, with its checkpoint.pt.sha256 record
GENOTYPE = "genotype.json"
_KIND = "search"  # rarn.checkpoint kind
_STATE_KEYS = ("epoch", "model", "w_opt", "a_opt", "constraint", "sample_gen", "history")


class RACLSearch:
    """Supernet, optimisers, Lipschitz estimator and chance constraint of one search.

    ``SearchConfig(sampling=False, grad_norm_weight=0)`` with ``ConstraintConfig(enabled=False)``
    is plain PC-DARTS (deterministic alpha/beta, first order).
    """

    def __init__(
        self,
        search: SearchConfig,
        constraint: ConstraintConfig,
        *,
        num_classes: int,
        in_channels: int,
        device: torch.device | str | None = None,
    ) -> None:
        check(search)  # every value rule lives in rarn.config (ConfigError names the key)
        check(constraint)
        self.cfg, self.ccfg = search, constraint
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = Supernet.from_config(search, num_classes=num_classes, in_channels=in_channels)
        self.model.lipschitz = LipschitzEstimator(  # the bound's per-op constants
            self.model.bounded_modules(),
            include_bn=constraint.include_bn,
            generator=torch.Generator().manual_seed(search.seed),
        )
        cells = self.model.cells
        self._shape = (len(cells), len(cells[0].edges), len(cells[0].edges[0].ops))
        self._n_ops = math.prod(self._shape)  # the estimator's op constants come first
        self._is_reduce = torch.tensor([c.reduction for c in cells])
        # model.train() walks and sets every module (thousands) twice a step: ~7 % of a CPU step
        # at 8 x 8 (cProfile, issue 20); _train_mode() checks this list and walks only if needed
        self._modules = list(self.model.modules())
        self.model.to(self.device)
        if search.channels_last:
            self.model.to(memory_format=torch.channels_last)
        enable_cudnn_autotune(self.device)  # the device of a search is chosen here
        self.w_opt, self.a_opt = _optimisers(self.model, search)
        self.constraint = ChanceConstraint.from_config(constraint)
        self._is_mean = [n.startswith("mu_") for n, _ in self.model.arch.named_parameters()]
        self._diag = ArchDiagnostics()  # this epoch's architecture steps (not checkpointed:
        # a checkpoint is written between epochs)
        self.sample_gen = torch.Generator().manual_seed(search.seed + 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.kept_arch: dict[str, Tensor] | None = None  # DARTS+ rollback target
        self._start_schedule()

    # -- pieces -------------------------------------------------------------------------------

    def bound_inputs(self, n_iters: int = 1, update: bool = True) -> BoundInputs:
        """Per-op log-constants of the current weights (power iteration advances ``n_iters``;
        ``update=False`` leaves the estimator's vectors as they are; float32)."""
        with full_precision(self.device):
            lam = self.model.lipschitz(n_iters=n_iters, update=update)
        n_cells = self._shape[0]
        fixed = lam[self._n_ops :]
        # stem + classifier; per cell the larger of its two preprocessing constants
        return BoundInputs(
            lam[: self._n_ops].view(self._shape),
            self._is_reduce,
            float(fixed[0] + fixed[1]),
            self.model.nodes,
            log_pre=fixed[2:].view(n_cells, 2).amax(dim=1),
            partial_channels=self.model.k,
        )

    def moments(self, inputs: BoundInputs) -> tuple[Tensor, Tensor]:
        """``(mu_F, sigma_F)`` of the log-bound under the current distributions (float32)."""
        arch, c = self.model.arch, self.ccfg
        with full_precision(self.device):
            if not self.cfg.sampling:  # a deterministic architecture: the bound, no spread
                mu = arch.mu()
                sigma = ArchSample(*map(torch.zeros_like, mu.as_tuple()))
                return delta_moments(mu, sigma, inputs, c.bound, c.mixture)
            estimate = ESTIMATORS[c.estimator]  # rarn.nas.constraint's registry
            return estimate(arch, inputs, c.bound, c.mixture, self.sample_gen, c.mc_samples)

    def _batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)`` on the search's device (asynchronous from pinned memory), ``x``
        channels-last when configured (a no-op for a batch already there)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _arch_logits(self) -> ArchSample:
        return (
            self.model.arch.sample(self.sample_gen) if self.cfg.sampling else self.model.arch.mu()
        )

    def _train_mode(self) -> None:
        """``model.train()``, skipped when every module is already in training mode (the same
        state; only the walk over the modules is saved)."""
        if not all(m.training for m in self._modules):
            self.model.train()

    def arch_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One constrained step on ``(mu, log sigma)`` from a D_V batch, then the dual update.

        The gradient is the CE's plus the constraint's, balanced by ``constraint.balance``
        (:mod:`rarn.nas.balance`); the returned metrics include their ratio and the chance
        part's share of the constraint. Only the network's pass may run in bf16
        (``SearchConfig.bf16``): the sample, the bound and ``h`` are float32 regions.
        """
        model, c, cc, dev = self.model, self.ccfg, self.constraint, self.device
        x, y = self._batch(x, y)
        self._train_mode()
        params = model.arch_parameters()
        with full_precision(dev):
            z = self._arch_logits()
        with autocast(dev, self.cfg.bf16):
            logits = model(x, z)
        ce = F.cross_entropy(logits.float(), y)
        inputs = self.bound_inputs(c.power_iterations)
        mu_f, sigma_f = self.moments(inputs)
        with full_precision(dev):
            log_bar = cc.update_threshold(model.arch.mu(), inputs, c.bound, c.mixture)
            h = cc.h(mu_f, sigma_f)
        h_val, sigma_f_val = float(h.detach()), float(sigma_f.detach())
        cc.set_unit(sigma_f_val)
        coef = cc.coefficient(h_val) if c.enabled else 0.0
        loss = ce.detach() + cc.penalty(h.detach()) if c.enabled else ce.detach()
        grads, stats = arch_gradients(
            ce, mu_f, sigma_f, cc.z_eta, coef, params, self._is_mean, c.balance
        )
        before = [p.detach().clone() for p, m in zip(params, self._is_mean) if m]
        for p, g in zip(params, grads):
            p.grad = g
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)
        model.arch.clamp_sigma(self.cfg.sigma_min, self.cfg.sigma_max)
        if c.enabled:
            cc.dual_step(h_val)
        mu_f_val = float(mu_f.detach())
        stats["confidence_share"] = confidence_share(cc.z_eta * sigma_f_val, cc.margin)
        after = [p.detach() for p, m in zip(params, self._is_mean) if m]
        self._diag.record(stats, [a - b for a, b in zip(after, before)], met=h_val <= 0)
        return {
            "arch_loss": float(loss),
            "val_ce": float(ce.detach()),
            "mu_F": mu_f_val,
            "sigma_F": sigma_f_val,
            "h": h_val,
            "y": cc.y,
            "log_lambda_bar": log_bar,
            "p_satisfied": satisfaction_probability(mu_f_val, sigma_f_val, log_bar),
            **stats,
        }

    def weight_step(self, x: Tensor, y: Tensor, *, penalty: bool = True) -> dict[str, float]:
        """One SGD step on ``CE + gamma E||grad_x CE||`` from a D_T batch
        (:func:`rarn.nas.gradnorm.weight_gradients`).

        With ``grad_norm_every = k > 1`` the caller asks for the term on every k-th step only
        (``penalty``), and it then weighs ``k gamma`` (lazy regularisation, see the config).
        With ``bf16`` the passes run under autocast on CUDA, except a finite-difference
        gradient-norm step (float32: its quotient divides rounding errors by ``fd_step``).
        """
        model, cfg = self.model, self.cfg
        x, y = self._batch(x, y)
        self._train_mode()
        params = [p for p in model.weight_parameters() if p.requires_grad]
        z = self._arch_logits()
        if cfg.sampling:  # the architecture is not updated here: no graph into (mu, sigma)
            z = ArchSample(*(t.detach() for t in z.as_tuple()))
        gamma = cfg.grad_norm_weight * cfg.grad_norm_every if penalty else 0.0
        fd = gamma > 0 and cfg.grad_norm_mode == "finite_difference"
        with autocast(self.device, cfg.bf16 and not fd):
            out = weight_gradients(model, params, x, y, z, gamma, cfg.grad_norm_mode, cfg.fd_step)
        for p, g in zip(params, out.grads):
            p.grad = g
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.w_opt.step()
        self.w_opt.zero_grad(set_to_none=True)
        acc = float((out.logits.argmax(1) == y).float().mean())
        stats = {} if out.grad_norm is None else {"grad_norm": out.grad_norm}
        return {"train_loss": float(out.loss.detach()), "train_acc": acc, **stats}

    def evaluate(self, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """``val_loss`` and ``val_acc`` of the median architecture in eval mode."""
        out = evaluate_model(self.model, loader, bf16=self.cfg.bf16)
        return {"val_loss": out["loss"], "val_acc": out["acc"]}

    def decode(self, mode: str | None = None) -> Genotype:
        """Decode by a magnitude rule (default :attr:`magnitude_rule`, the per-epoch decoding);
        the perturbation rules need D_V: :func:`rarn.nas.selection.decode_search`."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        mode = mode or self.magnitude_rule
        return decode(self.model, mode, self.ccfg.eta, self.cfg.decode_samples, gen)

    @property
    def magnitude_rule(self) -> str:
        """``search.decode`` when it reads the distributions, else ``quantile`` (the cheap rule
        of the per-epoch genotypes and checkpoints)."""
        return self.cfg.decode if self.cfg.decode in MAGNITUDE_DECODERS else "quantile"

    def keep_arch(self) -> None:
        """Remember the current distributions (the DARTS+ rollback target)."""
        self.kept_arch = {k: v.detach().clone() for k, v in self.model.arch.state_dict().items()}

    def rollback_arch(self) -> bool:
        """Restore the distributions :meth:`keep_arch` remembered (``False``: none was)."""
        if self.kept_arch is None:
            return False
        self.model.arch.load_state_dict(self.kept_arch)
        return True

    # -- the learning-rate schedule -----------------------------------------------------------

    @property
    def lr(self) -> float:
        """The weight step's current learning rate."""
        return self.w_opt.param_groups[0]["lr"]

    def _start_schedule(self) -> None:
        """The cosine schedule over this config's epochs, advanced to ``self.epoch``.

        The lr is a function of ``(epoch, search.epochs)`` only, so it is rebuilt rather than
        checkpointed: a resumed search, or a finished one extended to more epochs, gets the lr
        of an uninterrupted run.
        """
        for group in self.w_opt.param_groups:
            group["lr"] = group["initial_lr"] = self.cfg.lr
        self.w_sched = make_scheduler(self.w_opt, "cosine", self.cfg.epochs, self.cfg.lr_min)
        with warnings.catch_warnings():  # a replay: no optimizer step goes with these steps
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
            for _ in range(min(self.epoch, self.cfg.epochs)):
                self.w_sched.step()

    def end_epoch(self, metrics: dict[str, float]) -> None:
        """Record a finished epoch's metrics (adding the architecture steps' balance and
        movement diagnostics, :class:`rarn.nas.balance.ArchDiagnostics`) and move the lr to the
        next epoch's."""
        metrics.update(self._diag.metrics(self.model.arch.sigma().as_tuple()[:2]))
        self._diag = ArchDiagnostics()
        self.w_sched.step()
        self.epoch += 1
        self.history.append(metrics)

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "constraint": self.constraint.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "history": self.history,
            "kept_arch": self.kept_arch,
            "search_config": asdict(self.cfg),
            "constraint_config": asdict(self.ccfg),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            CheckpointError: keys are missing, or the supernet does not match (named by
                parameter).
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"not a search state: it lacks {missing}")
        load_state_checked(self.model, state["model"], what="search supernet")
        self.w_opt.load_state_dict(state["w_opt"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.constraint.load_state_dict(state["constraint"])
        if self.constraint.reference is not None:
            ref = self.constraint.reference.as_tuple()
            self.constraint.reference = ArchSample(*(t.to(self.device) for t in ref))
        self.sample_gen.set_state(state["sample_gen"])
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]
        kept = state.get("kept_arch")  # absent in checkpoints before issue 19
        self.kept_arch = None if kept is None else {k: v.to(self.device) for k, v in kept.items()}
        self._start_schedule()

    def save(self, directory: str | Path) -> Path:
        """Write ``checkpoint.pt`` (sha256-recorded) and ``genotype.json`` atomically into
        ``directory``."""
        d = Path(directory)
        save_checkpoint(d / CHECKPOINT, self.state_dict(), kind=_KIND)
        atomic_write(d / GENOTYPE, self.decode().to_json())
        return d / CHECKPOINT

    def load(self, directory: str | Path) -> None:
        """Resume from ``directory``'s checkpoint.

        Raises:
            CheckpointError: (a ValueError) naming the file: missing, corrupted, modified after
                it was written (sha256 record), not a search checkpoint, or another supernet.
        """
        path = Path(directory) / CHECKPOINT
        try:
            self.load_state_dict(load_checkpoint(path, kind=_KIND))
        except CheckpointError as e:
            where = "" if str(path) in str(e) else f"{path}: "
            raise CheckpointError(f"cannot read search checkpoint: {where}{e}") from e


# ----------------------------------------------------------------------------------------------
# Builders


def _optimisers(model: Supernet, search: SearchConfig) -> tuple[torch.optim.SGD, torch.optim.Adam]:
    """SGD on the weights; Adam on the architecture, weight decay on ``mu`` only."""
    w_opt = torch.optim.SGD(
        model.weight_parameters(),
        search.lr,
        momentum=search.momentum,
        weight_decay=search.weight_decay,
    )
    arch = model.arch
    mus = [getattr(arch, f"mu_{n}") for n in arch.NAMES]
    log_sigmas = [getattr(arch, f"log_sigma_{n}") for n in arch.NAMES]
    a_opt = torch.optim.Adam(
        [
            {"params": mus, "weight_decay": search.arch_weight_decay},
            {"params": log_sigmas, "weight_decay": 0.0},
        ],
        lr=search.arch_lr,
        betas=(search.arch_beta1, search.arch_beta2),
    )
    return w_opt, a_opt
