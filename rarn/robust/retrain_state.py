"""What retraining carries from epoch to epoch, as typed state with ``state_dict`` (as the search).

:class:`RetrainState` is everything that changes while :func:`rarn.robust.retrain.run_retrain`
trains: the weights, the optimiser and schedule, every random stream, the epoch, the history and
the selection (:class:`BestSoFar`). Saving it after every epoch and loading it back gives an
exact resume: a run interrupted after epoch k and resumed reproduces the uninterrupted run's
history and weights bit for bit (on the same device).

Two files per run directory, both written by :func:`rarn.checkpoint.save_checkpoint` (atomic,
sha256-recorded): ``last.pt`` (kind ``retrain``, keys :data:`_LAST_KEYS`, the whole state) and
``best.pt`` (kind ``best_model``: ``epoch``, ``model``, ``best``; the selected weights, rewritten
only when the selection changes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rarn.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint

__all__ = ["BEST", "LAST", "BestSoFar", "RetrainState"]

LAST, BEST = "last.pt", "best.pt"
_LAST_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "best", "history", "config")


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``module``'s state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@dataclass
class BestSoFar:
    """The selection rule's running choice (Rice et al. 2020, robust overfitting).

    ``selected_by`` names the rule and the epoch, e.g. ``"best_val_robust_acc@epoch 7"`` or, with
    no validation split, ``"last@epoch 3"``. Stored in both checkpoints as a plain dict.
    """

    metric: float = float("-inf")
    epoch: int = 0
    selected_by: str = ""

    def offer(self, score: float, rule: str, epoch: int) -> bool:
        """Take ``score`` if it beats the best so far (a tie keeps the earlier epoch)."""
        if not score > self.metric:
            return False
        self.metric, self.epoch, self.selected_by = float(score), epoch, f"{rule}@epoch {epoch}"
        return True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BestSoFar:
        return cls(float(d["metric"]), int(d["epoch"]), str(d["selected_by"]))


@dataclass
class RetrainState:
    """Everything retraining changes; :meth:`state_dict` is the ``last.pt`` payload.

    ``generators`` are the three seeded streams (``loader`` shuffling, ``attack`` random starts,
    ``drop_path`` masks); together with the global torch (and CUDA) RNG they make a resume exact.
    ``best_state`` is a CPU copy of the selected weights (initially the initial weights).
    """

    model: nn.Module  # the unwrapped network (shares its parameters with any DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, torch.Generator]
    config: dict[str, Any]  # config_to_dict(cfg): a resume under another config is refused
    device: torch.device
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    best: BestSoFar = field(default_factory=BestSoFar)
    best_state: dict[str, Tensor] = field(default_factory=dict)

    def end_epoch(self, epoch: int, metrics: dict[str, float], score: float, rule: str) -> bool:
        """Record a finished epoch; returns whether it became the selected one."""
        self.epoch = epoch
        self.history.append(metrics)
        improved = self.best.offer(score, rule, epoch)
        if improved:
            self.best_state = cpu_state(self.model)
        return improved

    # -- state dict ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "generators": {k: g.get_state() for k, g in self.generators.items()},
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "epoch": self.epoch,
            "model": cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "best": self.best.to_dict(),
            "history": self.history,
            "config": self.config,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict`'s output (``best_state`` is not in it: see :meth:`load`).

        Raises:
            CheckpointError: written under another config (naming the keys that differ), or
                weights that do not fit the model.
        """
        if state["config"] != self.config:
            diff = sorted(k for k in self.config if state["config"].get(k) != self.config[k])
            raise CheckpointError(f"{source}: written with a different config ({diff})")
        load_state_checked(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        for name, g in self.generators.items():
            g.set_state(rng["generators"][name])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.best = BestSoFar.from_dict(state["best"])

    # -- files -----------------------------------------------------------------------------------

    def save(self, directory: Path, *, best_changed: bool) -> None:
        """Write ``best.pt`` (when the selection changed, first) and ``last.pt``."""
        if best_changed:
            best = {"epoch": self.epoch, "model": self.best_state, "best": self.best.to_dict()}
            save_checkpoint(directory / BEST, best, kind="best_model")
        save_checkpoint(directory / LAST, self.state_dict(), kind="retrain")

    def load(self, directory: Path) -> None:
        """Resume from ``directory/last.pt`` and, once an epoch was selected, ``best.pt``."""
        path = directory / LAST
        ck = load_checkpoint(path, kind="retrain", required=_LAST_KEYS)
        self.load_state_dict(ck, source=str(path))
        if self.best.epoch > 0:
            bk = load_checkpoint(directory / BEST, kind="best_model", required=("model", "best"))
            self.best_state = dict(bk["model"])
