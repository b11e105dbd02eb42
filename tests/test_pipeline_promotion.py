"""A run's model takes the alias only once its evaluation succeeded (on the shared Ray instance).

A bundled genotype is retrained with ``--stages retrain`` (registered, not promoted: never
evaluated), its logged weights are then corrupted so that the evaluation fails (exit 1, still not
promoted), and once they are restored ``--resume`` evaluates it and promotes the same version.
The masking checks are off and the eps curve has one point: a one-epoch smoke model predicts at
chance at every eps, which the curve check rightly flags (see test_pipeline_registry for flags).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.run import EXIT, main
from pipeline.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]
NAME = "rarn-smoke"


@pytest.mark.slow
def test_failed_or_skipped_evaluation_is_never_promoted(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--config", str(ROOT / "configs/smoke.yaml"), f"run_dir={tmp_path}/run",
            "retrain.genotype=RACL", "evaluation.checks=false",
            "evaluation.eps_curve=[0.1]"]  # fmt: skip
    client = Tracking(f"sqlite:///{tmp_path}/mlflow.db", "", "").client()

    def champion() -> str | None:
        version = client.get_registered_model(NAME).aliases.get("champion")
        return None if version is None else str(version)

    # 1. Retrained, not evaluated: a registered version without the alias, and the reason.
    assert main([*args, "--stages", "retrain"]) == EXIT["ok"]
    out = capsys.readouterr().out
    assert f"models:/{NAME}/1 (version 1, trial RACL, not champion: not evaluated)" in out, out
    assert champion() is None
    # 2. The evaluation fails (the logged weights no longer match their digest): exit 1.
    weights = next(tmp_path.glob("mlruns/**/artifacts/weights.pt"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert main([*args, "--stages", "evaluate", "--resume"]) == EXIT["failed"]
    err = capsys.readouterr().err
    assert "evaluation failed for RACL" in err and "nothing is registered or promoted" in err
    assert champion() is None
    # 3. Restored: --resume evaluates it, and the same version becomes the champion.
    weights.write_bytes(original)
    assert main([*args, "--stages", "evaluate", "--resume"]) == EXIT["ok"]
    out = capsys.readouterr().out
    assert f"models:/{NAME}@champion (version 1, trial RACL, @champion: no current champion)" in out
    assert champion() == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert len(tags["rarn.eval_data_sha256"]) == 64 and tags["rarn.masking_flags"] == "none"
