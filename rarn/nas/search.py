"""RACL bilevel search (spec §2.7, Algorithm 1): weight step on D_T, constrained architecture step
on D_V, decoding to a :class:`~rarn.nas.genotype.Genotype`.

* Weight step (SGD, cosine lr, grad clipping): ``CE + gamma * E_x ||grad_x CE||_2`` on a fresh
  sample of the architecture; the gradient-norm term is exact (double backprop) or a finite
  difference along the input-gradient direction (``(l(x + h d) - l(x)) / h``, ``d`` the unit
  input gradient; two forward/backward passes instead of a double backward).
* Architecture step (Adam on ``(mu, log sigma)``; weight decay on ``mu`` only, since decay on
  ``log sigma`` drags sigma towards 1, spec §12): validation CE on a reparameterised sample plus
  the augmented-Lagrangian term of the chance constraint on ``(mu_F, sigma_F)``, then dual ascent.
  The per-op Lipschitz constants are detached (the paper constrains architecture parameters).
* :func:`run_search` is a plain function (no Ray) with per-epoch observer callbacks and a complete
  checkpoint (weights, distributions, optimisers, dual state, power-iteration buffers, RNG state):
  a resumed search continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.config import ConstraintConfig, SearchConfig
from rarn.lipschitz.estimator import LipschitzEstimator
from rarn.nas.constraint import (
    BOUNDS,
    ESTIMATORS,
    MIXTURES,
    BoundInputs,
    ChanceConstraint,
    delta_moments,
    monte_carlo_moments,
    satisfaction_probability,
)
from rarn.nas.decode import DECODERS, decode
from rarn.nas.genotype import Genotype, parametric_share
from rarn.nas.supernet import ArchSample, Supernet

__all__ = [
    "RACLSearch",
    "SearchCallback",
    "SearchData",
    "SearchDiverged",
    "SearchResult",
    "run_search",
]

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
GENOTYPE = "genotype.json"


class SearchDiverged(RuntimeError):
    """A loss became non-finite; names the epoch, step and which loss."""

    def __init__(self, epoch: int, step: int, what: str, value: float) -> None:
        super().__init__(f"search diverged at epoch {epoch}, step {step}: {what} = {value}")
        self.epoch, self.step, self.what, self.value = epoch, step, what, value

    def __reduce__(self) -> tuple:  # picklable across processes (Ray trials, multiprocessing)
        return type(self), (self.epoch, self.step, self.what, self.value)


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
    genotype: Genotype
    genotypes: dict[str, Genotype]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------------------------
# The search object: one weight step, one architecture step.


def _cosine_lr(epoch: int, epochs: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * epoch / max(1, epochs)))


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
        _validate(search, constraint)
        self.cfg, self.ccfg = search, constraint
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):  # module init uses the global RNG; do not leak
            torch.manual_seed(search.seed)
            gen = torch.Generator().manual_seed(search.seed)
            self.model = Supernet(
                search.init_channels,
                num_classes,
                search.layers,
                in_channels,
                nodes=search.nodes,
                k=search.partial_channels,
                sigma_init=search.sigma_init,
                fused=search.fused,
                generator=gen,
            )
        cells = list(self.model.cells)
        ops = [op for cell in cells for edge in cell.edges for op in edge.ops]
        fixed = [self.model.stem, self.model.classifier]
        fixed += [m for cell in cells for m in (cell.preprocess0, cell.preprocess1)]
        self.model.lipschitz = LipschitzEstimator(
            ops + fixed,
            include_bn=constraint.include_bn,
            generator=torch.Generator().manual_seed(search.seed),
        )
        self._n_ops = len(ops)
        self._shape = (len(cells), len(cells[0].edges), len(cells[0].edges[0].ops))
        self._is_reduce = torch.tensor([c.reduction for c in cells])
        self.model.to(self.device)
        self.w_opt = torch.optim.SGD(
            self.model.weight_parameters(),
            search.lr,
            momentum=search.momentum,
            weight_decay=search.weight_decay,
        )
        arch = self.model.arch
        self.a_opt = torch.optim.Adam(
            [
                {
                    "params": [getattr(arch, f"mu_{n}") for n in arch.NAMES],
                    "weight_decay": search.arch_weight_decay,
                },
                {
                    "params": [getattr(arch, f"log_sigma_{n}") for n in arch.NAMES],
                    "weight_decay": 0.0,
                },
            ],
            lr=search.arch_lr,
            betas=(search.arch_beta1, search.arch_beta2),
        )
        self.constraint = ChanceConstraint(
            constraint.eta,
            constraint.rho,
            constraint.threshold,
            constraint.kappa,
            constraint.log_lambda_bar,
            constraint.dual_init,
        )
        self.sample_gen = torch.Generator().manual_seed(search.seed + 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    # -- pieces -------------------------------------------------------------------------------

    def bound_inputs(self, n_iters: int = 1) -> BoundInputs:
        """Per-op log-constants of the current weights (power iteration advances ``n_iters``)."""
        lam = self.model.lipschitz(n_iters=n_iters)
        n_cells = self._shape[0]
        fixed = lam[self._n_ops :]
        # stem + classifier + per cell the larger of its two preprocessing constants
        pre = fixed[2:].view(n_cells, 2).amax(dim=1)
        log_c = float(fixed[0] + fixed[1] + pre.sum())
        return BoundInputs(
            lam[: self._n_ops].view(self._shape), self._is_reduce, log_c, self.model.nodes
        )

    def moments(self, inputs: BoundInputs) -> tuple[Tensor, Tensor]:
        """``(mu_F, sigma_F)`` of the log-bound under the current distributions."""
        arch, c = self.model.arch, self.ccfg
        if c.estimator == "delta" or not self.cfg.sampling:
            sigma = (
                arch.sigma()
                if self.cfg.sampling
                else ArchSample(*(torch.zeros_like(t) for t in arch.mu().as_tuple()))
            )
            return delta_moments(arch.mu(), sigma, inputs, c.bound, c.mixture)
        draws = arch.sample(self.sample_gen, n=c.mc_samples)
        return monte_carlo_moments(draws, inputs, c.bound, c.mixture)

    def _arch_logits(self) -> ArchSample:
        return (
            self.model.arch.sample(self.sample_gen) if self.cfg.sampling else self.model.arch.mu()
        )

    def arch_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One constrained step on ``(mu, log sigma)`` from a D_V batch, then the dual update."""
        model, c = self.model, self.ccfg
        model.train()
        params = model.arch_parameters()
        ce = F.cross_entropy(model(x, self._arch_logits()), y)
        loss = ce
        inputs = self.bound_inputs(c.power_iterations)
        mu_f, sigma_f = self.moments(inputs)
        log_bar = self.constraint.update_threshold(model.arch.mu(), inputs, c.bound, c.mixture)
        h = self.constraint.h(mu_f, sigma_f)
        if c.enabled:
            loss = loss + self.constraint.penalty(h)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)
        model.arch.clamp_sigma(self.cfg.sigma_min, self.cfg.sigma_max)
        h_val = float(h.detach())
        if c.enabled:
            self.constraint.dual_step(h_val)
        return {
            "arch_loss": float(loss.detach()),
            "val_ce": float(ce.detach()),
            "mu_F": float(mu_f.detach()),
            "sigma_F": float(sigma_f.detach()),
            "h": h_val,
            "y": self.constraint.y,
            "log_lambda_bar": log_bar,
            "p_satisfied": satisfaction_probability(
                float(mu_f.detach()), float(sigma_f.detach()), log_bar
            ),
        }

    def weight_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """One SGD step on ``CE + gamma E||grad_x CE||`` from a D_T batch."""
        model, cfg = self.model, self.cfg
        model.train()
        params = [p for p in model.weight_parameters() if p.requires_grad]
        z = self._arch_logits()
        if cfg.sampling:  # the architecture is not updated here: no graph into (mu, sigma)
            z = ArchSample(*(t.detach() for t in z.as_tuple()))
        gamma, B = cfg.grad_norm_weight, x.shape[0]
        stats: dict[str, float] = {}
        if gamma == 0:
            logits = model(x, z)
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, params)
        elif cfg.grad_norm_mode == "exact":
            x = x.detach().requires_grad_(True)
            logits = model(x, z)
            per = F.cross_entropy(logits, y, reduction="none")
            (gx,) = torch.autograd.grad(per.sum(), x, create_graph=True)
            gnorm = gx.flatten(1).norm(dim=1)
            loss = per.mean() + gamma * gnorm.mean()
            grads = torch.autograd.grad(loss, params)
            stats["grad_norm"] = float(gnorm.detach().mean())
        else:  # finite difference along the input-gradient direction
            x = x.detach().requires_grad_(True)
            logits = model(x, z)
            per = F.cross_entropy(logits, y, reduction="none")
            g0 = torch.autograd.grad(per.sum(), [x, *params])
            gx, gw0 = g0[0], g0[1:]
            gnorm = gx.flatten(1).norm(dim=1)
            d = gx / gnorm.clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            hstep = cfg.fd_step
            per2 = F.cross_entropy(model(x.detach() + hstep * d, z), y, reduction="none")
            gw1 = torch.autograd.grad(per2.sum(), params)
            a, b = (1.0 - gamma / hstep) / B, (gamma / hstep) / B
            grads = [a * g0_ + b * g1_ for g0_, g1_ in zip(gw0, gw1)]
            loss = per.mean() + gamma * ((per2 - per) / hstep).mean()
            stats["grad_norm"] = float(gnorm.detach().mean())
        for p, g in zip(params, grads):
            p.grad = g
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.w_opt.step()
        self.w_opt.zero_grad(set_to_none=True)
        acc = float((logits.argmax(1) == y).float().mean())
        return {"train_loss": float(loss.detach()), "train_acc": acc, **stats}

    @torch.no_grad()
    def evaluate(self, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """Loss and accuracy of the median architecture in eval mode."""
        self.model.eval()
        n, loss, correct = 0, 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = self.model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += y.numel()
        return {"val_loss": loss / max(n, 1), "val_acc": correct / max(n, 1)}

    def decode(self, mode: str | None = None) -> Genotype:
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        return decode(
            self.model, mode or self.cfg.decode, self.ccfg.eta, self.cfg.decode_samples, gen
        )

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "rarn.nas.search/1",
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "constraint": self.constraint.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "history": self.history,
            "search_config": asdict(self.cfg),
            "constraint_config": asdict(self.ccfg),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != "rarn.nas.search/1":
            raise ValueError(f"not a rarn search checkpoint (format={state.get('format')!r})")
        self.model.load_state_dict(state["model"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.constraint.load_state_dict(state["constraint"])
        if self.constraint.reference is not None:
            ref = self.constraint.reference.as_tuple()
            self.constraint.reference = ArchSample(*(t.to(self.device) for t in ref))
        self.sample_gen.set_state(state["sample_gen"])
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]

    def save(self, directory: str | Path) -> Path:
        """Write ``checkpoint.pt`` and ``genotype.json`` atomically into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (CHECKPOINT + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, d / CHECKPOINT)
        (d / (GENOTYPE + ".tmp")).write_text(self.decode().to_json())
        os.replace(d / (GENOTYPE + ".tmp"), d / GENOTYPE)
        return d / CHECKPOINT

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / CHECKPOINT
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # corrupted or not a torch file
            raise ValueError(f"cannot read search checkpoint {path}: {e}") from e
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: not a checkpoint dict")
        self.load_state_dict(state)


def _validate(search: SearchConfig, c: ConstraintConfig) -> None:
    problems = []
    if search.epochs < 1 or search.batch_size < 1:
        problems.append("search.epochs and search.batch_size must be >= 1")
    if search.grad_norm_mode not in ("exact", "finite_difference"):
        problems.append(
            f"search.grad_norm_mode {search.grad_norm_mode!r}: use exact | finite_difference"
        )
    if search.decode not in DECODERS:
        problems.append(f"search.decode {search.decode!r}: use one of {', '.join(DECODERS)}")
    if search.grad_norm_weight < 0 or search.fd_step <= 0:
        problems.append("search.grad_norm_weight must be >= 0 and search.fd_step > 0")
    if c.bound not in BOUNDS:
        problems.append(f"constraint.bound {c.bound!r}: use one of {', '.join(BOUNDS)}")
    if c.mixture not in MIXTURES:
        problems.append(f"constraint.mixture {c.mixture!r}: use one of {', '.join(MIXTURES)}")
    if c.estimator not in ESTIMATORS:
        problems.append(f"constraint.estimator {c.estimator!r}: use one of {', '.join(ESTIMATORS)}")
    if c.estimator == "monte_carlo" and c.mc_samples < 2:
        problems.append("constraint.mc_samples must be >= 2")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The loop


def _check(value: float, epoch: int, step: int, what: str) -> None:
    if not math.isfinite(value):
        raise SearchDiverged(epoch, step, what, value)


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
        The decoded genotype (``search.decode`` rule), all decodings, and per-epoch metrics.

    Raises:
        SearchDiverged: a loss or the bound became non-finite.
    """
    from rarn.data import make_loader

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
    dev = s.device
    for epoch in range(s.epoch, search.epochs):
        t0 = time.perf_counter()
        lr = _cosine_lr(epoch, search.epochs, search.lr, search.lr_min)
        for group in s.w_opt.param_groups:
            group["lr"] = lr
        # Data order depends only on (seed, epoch): nothing to checkpoint, exact on resume.
        g_t = torch.Generator().manual_seed(search.seed * 1_000_003 + 2 * epoch)
        g_v = torch.Generator().manual_seed(search.seed * 1_000_003 + 2 * epoch + 1)
        train = make_loader(
            data.train, search.batch_size, shuffle=True, generator=g_t, drop_last=True
        )
        val = make_loader(data.val, search.batch_size, shuffle=True, generator=g_v, drop_last=True)
        arch_on = epoch >= search.warmup_epochs
        sums: Counter = Counter()
        n_w = n_a = n_sat = 0
        for step, ((xt, yt), (xv, yv)) in enumerate(zip(train, _cycle(val))):
            if search.max_steps_per_epoch and step >= search.max_steps_per_epoch:
                break
            if arch_on:
                a = s.arch_step(xv.to(dev), yv.to(dev))
                for k in ("arch_loss", "mu_F", "sigma_F", "h"):
                    _check(a[k], epoch + 1, step, k)
                sums.update({k: v for k, v in a.items() if k not in ("y", "log_lambda_bar")})
                n_a += 1
                n_sat += a["h"] <= 0
                last_arch = a
            w = s.weight_step(xt.to(dev), yt.to(dev))
            _check(w["train_loss"], epoch + 1, step, "train_loss")
            sums.update(w)
            n_w += 1
        if n_w == 0:
            raise ValueError("empty D_T: no training batch (dataset smaller than batch_size?)")
        metrics: dict[str, float] = {
            k: sums[k] / n_w for k in ("train_loss", "train_acc", "grad_norm") if k in sums
        }
        metrics.update(s.evaluate(make_loader(data.val, 2 * search.batch_size, shuffle=False)))
        if not arch_on:  # report the bound during warm-up too (no step, no threshold)
            mu_f, sigma_f = s.moments(s.bound_inputs(constraint.power_iterations))
            metrics.update(mu_F=float(mu_f.detach()), sigma_F=float(sigma_f.detach()))
        else:
            for k in ("mu_F", "sigma_F", "h", "p_satisfied", "val_ce"):
                metrics[k] = sums[k] / n_a
            metrics.update(
                y=last_arch["y"],
                log_lambda_bar=last_arch["log_lambda_bar"],
                frac_satisfied=n_sat / n_a,
                mu_F_last=last_arch["mu_F"],
                h_last=last_arch["h"],
            )
        genotype = s.decode()
        metrics.update(
            epoch=float(epoch + 1),
            lr=lr,
            parametric_share=parametric_share(genotype),
            arch_steps=float(n_a),
            epoch_time=time.perf_counter() - t0,
        )
        s.epoch = epoch + 1
        s.history.append(metrics)
        log.info(
            "epoch %d/%d %s",
            epoch + 1,
            search.epochs,
            json.dumps({k: round(v, 4) for k, v in metrics.items()}),
        )
        if checkpoint_dir is not None:
            s.save(checkpoint_dir)
        for cb in callbacks:
            cb(epoch + 1, dict(metrics))
    genotypes = {mode: s.decode(mode) for mode in DECODERS}
    return SearchResult(genotypes[search.decode], genotypes, s.history)


def _cycle(loader: Iterable) -> Iterable:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("empty D_V: no validation batch (dataset smaller than batch_size?)")
