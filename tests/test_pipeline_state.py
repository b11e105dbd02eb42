"""Run state, summary and environment defaults: pure helpers, no Ray, no MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.env import LOOPBACK, QUIET, TESTING, apply_env_defaults, env_defaults
from pipeline.report import summary
from pipeline.state import (
    EvalOutcome,
    Registration,
    RetrainOutcome,
    RunState,
    SearchState,
    TrialOutcome,
)
from pipeline.trials import trial_points, with_overrides
from rarn.config import ConfigError, load_config
from rarn.space.genotype import get_genotype


def _state() -> RunState:
    g = get_genotype("RACL")
    trials = [
        TrialOutcome("t00", {"search.seed": 0}, "TERMINATED", {"val_acc": 0.5}, True, None, "s0",
                     g.sha256(), g),
        TrialOutcome("t01", {"search.seed": 1}, "ERROR", error="SearchDiverged: nan"),
    ]  # fmt: skip
    metrics = {"final_val_robust_acc": 0.3, "final_log_lipschitz_upper": 4.2}
    return RunState(
        tracking_uri="sqlite:////x/mlflow.db",
        experiment_id="1",
        parent_run_id="p",
        search=SearchState(["t00"], trials),
        retrain={
            "t00": RetrainOutcome("t00", g.sha256(), "s0", "r0", "models:/m-1", "d" * 64, metrics),
            "RACL": RetrainOutcome("RACL", g.sha256(), "", error="no model was logged"),
        },
        evaluate={"t00": EvalOutcome("t00", {"eval_clean_acc": 0.9, "eval_worst_case_acc": 0.4})},
    )


def test_run_state_round_trips_through_state_json(tmp_path):
    state = _state()
    state.registered = Registration("rarn-x", "champion", "1", "models:/rarn-x@champion", "t00")
    state.save(tmp_path)
    assert RunState.load(tmp_path) == state
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    raw = json.loads((tmp_path / "state.json").read_text())
    assert raw["search"]["done"] and raw["search"]["selected"] == ["t00"]
    assert RunState.from_dict({}) == RunState()  # an empty state file resumes as a new run
    assert RunState().to_dict()["search"] == {} and RunState().to_dict()["registered"] == {}


def test_what_is_finished_and_the_champion():
    state = _state()
    assert state.retrain_done("t00") and not state.retrain_done("RACL")
    assert not state.retrain_done("t09") and [o.key for o in state.retrained()] == ["t00"]
    assert state.evaluate_done("t00") and state.eval_metrics("t09") == {}
    assert state.champion().key == "t00"
    state.retrain["t00"].model_uri = None
    assert state.champion() is None


def test_summary_ranks_models_and_names_failures():
    text = summary(_state(), experiment="rarn-x", tracking_uri="sqlite:////x/mlflow.db",
                   parent_run_id="p", run_dir=Path("/runs/x"))  # fmt: skip
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["rank", "trial", "overrides"]
    assert lines[1].split()[:3] == ["1", "t00", "search.seed=0"] and "4.20" in lines[1]
    assert lines[2].split()[:2] == ["2", "RACL"]
    assert "errored trial t01 {'search.seed': 1}: SearchDiverged: nan" in lines
    assert "failed retraining RACL: no model was logged" in lines
    assert "MLflow UI:        mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in lines


def test_env_defaults_never_override_the_user(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # this test's own copy
    for k in {**QUIET, **LOOPBACK, **TESTING}:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert set(env_defaults(connect=True)) == set(QUIET)  # a cluster's own settings stay
    applied = apply_env_defaults()
    assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_MODE" not in applied
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert set(applied) == (set(QUIET) | set(LOOPBACK)) - {"RAY_AUTH_MODE"}


def test_trial_points_keep_values_exactly_and_name_the_param_space():
    cfg = load_config(
        "configs/smoke.yaml", ["tune.param_space={'constraint.kappa': [0.0078431, 0.05]}"]
    )
    points = trial_points(cfg)
    assert [p["key"] for p in points] == ["t00", "t01"]
    kappas = [with_overrides(cfg, {"constraint.kappa": p["constraint.kappa"]}).constraint.kappa
              for p in points]  # fmt: skip
    assert kappas == [0.0078431, 0.05] and all(type(k) is float for k in kappas)
    with pytest.raises(ConfigError, match="tune.param_space"):
        with_overrides(cfg, {"search.epochs": -1})


def test_stage_times_in_summary_and_parent_run_metrics():
    from types import SimpleNamespace

    from pipeline.tracking import log_stage_times

    times = {"search": 443.2, "retrain": 29.0, "evaluate": 366.4, "total": 840.1}
    text = summary(_state(), experiment="rarn-x", tracking_uri="sqlite:////x/mlflow.db",
                   parent_run_id="p", run_dir=Path("/runs/x"), stage_times=times)  # fmt: skip
    assert "time per stage:   search 443 s, retrain 29 s, evaluate 366 s (total 840 s)" in text
    logged: list = []
    client = SimpleNamespace(log_batch=lambda run_id, metrics: logged.append((run_id, metrics)))
    log_stage_times(SimpleNamespace(client=lambda: client, parent_run_id="p"), times)
    ((run_id, metrics),) = logged
    assert run_id == "p"
    assert {m.key: m.value for m in metrics} == {
        "time_search_s": 443.2, "time_retrain_s": 29.0, "time_evaluate_s": 366.4,
        "time_total_s": 840.1,
    }  # fmt: skip
