"""The pipeline's stages are one table (issue 18): pipeline.order.STAGE_TABLE names each
``Pipeline`` method and when it runs; the CLI's ``--stages`` choices are its selectable entries."""

from __future__ import annotations

from pipeline.order import STAGE_TABLE, selectable
from pipeline.run import STAGES
from pipeline.stages import Pipeline
from rarn.config import config_from_dict


def test_every_entry_is_a_pipeline_stage_method() -> None:
    names = [s.name for s in STAGE_TABLE]
    assert len(set(names)) == len(names)
    for name in names:
        assert callable(getattr(Pipeline, name)), name
    assert STAGES == selectable() == ("search", "retrain", "evaluate")


def test_what_runs_for_the_asked_stages() -> None:
    plain = config_from_dict({})
    study = config_from_dict({"study": {"variants": ["racl"], "seeds": [0]}})

    def runs(cfg, asked):
        return [s.name for s in STAGE_TABLE if s.runs(cfg, asked)]

    assert runs(plain, ["search"]) == ["search"]
    assert runs(plain, ["retrain"]) == ["retrain", "register"]
    assert runs(plain, list(STAGES)) == ["search", "retrain", "evaluate", "register"]
    assert runs(study, list(STAGES)) == ["search", "retrain", "evaluate", "study", "register"]
    assert runs(study, ["search", "retrain"]) == ["search", "retrain", "register"]
