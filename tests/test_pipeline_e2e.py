"""End to end: ``pipeline/run.py --config configs/smoke.yaml`` on the shared Ray instance.

Checks the registered model and its alias, the lineage (parent -> search trials -> retraining,
tags pointing back), run statuses, the params allow-list, and the registry CLI (``show`` and
``evaluate``, which re-checks the model's sha256 before loading it, and ``verify``, which reruns
ten rows of the evaluation's ledger). The retraining is the default one-worker Ray task (two
Ray Train workers, DDP over gloo: the three-node module, or the submitted job of
test_pipeline_cluster.py where that cannot run); the search runs under the ASHA scheduler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import registry
from pipeline.run import main
from pipeline.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_pipeline_registers_champion_with_lineage(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "do-not-log-me")
    # ASHA may stop the weaker search after epoch 1.
    overrides = ["tune.scheduler=asha", "tune.grace_period=1"]
    # The smoke model (one epoch) predicts at chance at every eps: its evaluation raises
    # masking flags, so only --force-promote makes it the champion (see test_pipeline_registry).
    rc = main(["--config", str(ROOT / "configs/smoke.yaml"), "--force-promote", *overrides])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "models:/rarn-smoke@champion" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = Tracking(uri, "", "").client()
    mv = client.get_model_version_by_alias("rarn-smoke", "champion")
    tags = mv.tags
    assert tags["rarn.force_promote"] == "true" and "--force-promote" in tags["rarn.promotion"]
    assert len(tags["rarn.eval_data_sha256"]) == 64
    parent = client.get_run(tags["rarn.parent_run_id"])
    search = client.get_run(tags["rarn.search_run_id"])
    retrain = client.get_run(tags["rarn.retrain_run_id"])
    # Lineage: both children nest under the parent and point at each other by tags.
    assert search.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert retrain.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert retrain.data.tags["rarn.search_run_id"] == search.info.run_id
    assert retrain.data.tags["rarn.genotype_sha"] == search.data.tags["rarn.genotype_sha"]
    assert tags["rarn.genotype_sha"] == search.data.tags["rarn.genotype_sha"]
    assert tags["rarn.model_sha256"] == retrain.data.tags["rarn.model_sha256"]
    assert len(parent.data.tags["rarn.data_fingerprint"]) == 64
    assert parent.data.tags["rarn.code_version"]
    assert {"eval_clean_acc", "eval_pgd_acc", "eval_worst_case_acc"} <= set(retrain.data.metrics), (
        tmp_path / "runs/smoke/state.json"
    ).read_text()
    assert "final_log_lipschitz_upper" in retrain.data.metrics
    # Every run ended; no credentials or tracking settings among the params.
    exp = parent.info.experiment_id
    runs = client.search_runs([exp])
    assert len(runs) == 1 + 2 + 1  # parent, two search trials, one retraining
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert not [k for k in r.data.params if k.startswith("tracking")]
        assert not [v for v in r.data.params.values() if "do-not-log-me" in v]
    # The registry CLI: lineage, then a sha256-checked reload and re-evaluation.
    assert registry.main(["--tracking-uri", uri, "show", "rarn-smoke@champion"]) == 0
    shown = capsys.readouterr().out
    assert search.info.run_id in shown and retrain.info.run_id in shown and "(verified)" in shown
    args = ["--tracking-uri", uri, "evaluate", "models:/rarn-smoke@champion", "--attacks", "fgsm"]
    assert registry.main([*args, "--output", str(tmp_path / "re.parquet")]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert (tmp_path / "re.parquet").stat().st_size > 0
    # The ledger: ten rows of the logged records rerun on the checked weights, exactly.
    assert registry.main(["--tracking-uri", uri, "verify", "rarn-smoke@champion"]) == 0
    verified = capsys.readouterr().out
    assert "10 ledger rows rerun" in verified and "every row reproduced" in verified, verified
    assert retrain.data.tags["rarn.eval_headline"].endswith(
        f"of {int(retrain.data.metrics['eval_n'])})"
    )
