"""The stage table: which :class:`pipeline.stages.Pipeline` stages run, in which order.

One entry per stage, in the order they run: its name (the ``Pipeline`` method that runs it) and
when it runs, given the config and the stages asked for with ``--stages``. The selectable ones
are the ``--stages`` choices. A new stage is an entry here, its method in
:mod:`pipeline.stages` and its typed outcome in :mod:`pipeline.state`. Light on purpose: the CLI
reads it before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from rarn.config import Config

__all__ = ["STAGE_TABLE", "Stage", "selectable"]


@dataclass(frozen=True)
class Stage:
    """One stage: ``Pipeline.<name>()`` runs when ``runs(cfg, asked)``."""

    name: str
    runs: Callable[[Config, Collection[str]], bool]
    selectable: bool = True  # a --stages choice (else it follows from the chosen ones)


def _asked(name: str) -> Callable[[Config, Collection[str]], bool]:
    return lambda cfg, asked: name in asked


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("search", _asked("search")),
    Stage("retrain", _asked("retrain")),
    Stage("evaluate", _asked("evaluate")),  # and the transfer matrix, with evaluation.transfer
    Stage("study", lambda cfg, asked: bool(cfg.study.variants) and "evaluate" in asked, False),
    Stage("register", lambda cfg, asked: "retrain" in asked or "evaluate" in asked, False),
)


def selectable() -> tuple[str, ...]:
    """The ``--stages`` choices, in their order."""
    return tuple(s.name for s in STAGE_TABLE if s.selectable)
