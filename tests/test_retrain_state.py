"""Tests for the retraining state (rarn.robust.retrain_state) and the shared divergence rule."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from rarn.checkpoint import CheckpointError, load_checkpoint
from rarn.robust.loop import Diverged, TrainingDiverged, check_finite, make_scheduler
from rarn.robust.retrain_state import BEST, LAST, BestSoFar, RetrainState, cpu_state


class _StageDiverged(Diverged):  # how another stage (the search) reuses the rule
    stage = "search"


def test_diverged_errors_name_the_place_and_survive_pickling() -> None:
    err = TrainingDiverged(3, 1, float("nan"))
    assert str(err) == "training diverged at epoch 3, step 1: loss = nan"
    other = _StageDiverged(2, 5, "bound", float("inf"))
    assert str(other) == "search diverged at epoch 2, step 5: bound = inf"
    for e in (err, other):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
        assert (back.epoch, back.step, back.what) == (e.epoch, e.step, e.what)
    check_finite(1.0, epoch=1, step=0)
    with pytest.raises(TrainingDiverged, match="epoch 4, step 2: loss = inf"):
        check_finite(math.inf, epoch=4, step=2)
    with pytest.raises(_StageDiverged, match="search diverged .* val_loss = nan"):
        check_finite(math.nan, epoch=1, step=0, what="val_loss", error=_StageDiverged)


def test_best_so_far_keeps_the_first_best_and_round_trips() -> None:
    best = BestSoFar()
    assert best.offer(0.5, "best_val_robust_acc", 1)
    assert not best.offer(0.5, "best_val_robust_acc", 2)  # a tie keeps the earlier epoch
    assert not best.offer(float("nan"), "best_val_robust_acc", 3)
    assert best.offer(0.75, "best_val_robust_acc", 4)
    assert best.selected_by == "best_val_robust_acc@epoch 4" and best.epoch == 4
    assert BestSoFar.from_dict(best.to_dict()) == best
    assert best.to_dict() == {"metric": 0.75, "epoch": 4, "selected_by": best.selected_by}


def _state(seed: int, config: dict | None = None) -> RetrainState:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gens = {"loader": torch.Generator().manual_seed(seed), "attack": torch.Generator()}
    return RetrainState(
        model,
        opt,
        make_scheduler(opt, "cosine", 10),
        gens,
        config or {"lr": 0.1},
        torch.device("cpu"),
        best_state=cpu_state(model),
    )


def test_retrain_state_round_trips_through_its_files(tmp_path: Path) -> None:
    a = _state(0)
    a.model(torch.ones(4, 3)).sum().backward()
    a.optimizer.step()
    a.scheduler.step()
    a.generators["loader"].manual_seed(7)
    assert a.end_epoch(1, {"epoch": 1.0, "val_robust_acc": 0.3}, 0.3, "best_val_robust_acc")
    a.save(tmp_path, best_changed=True)
    assert set(load_checkpoint(tmp_path / LAST, kind="retrain")) >= set(a.state_dict())
    assert load_checkpoint(tmp_path / BEST, kind="best_model")["best"] == a.best.to_dict()
    b = _state(1)
    b.load(tmp_path)
    assert (b.epoch, b.history, b.best) == (a.epoch, a.history, a.best)
    assert b.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    assert b.scheduler.state_dict() == a.scheduler.state_dict()
    assert torch.equal(b.generators["loader"].get_state(), a.generators["loader"].get_state())
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]) and torch.equal(v, b.best_state[k])
    with pytest.raises(
        CheckpointError, match=r"last.pt: written with a different config \(\['lr'\]\)"
    ):
        _state(2, {"lr": 0.2}).load(tmp_path)
