"""Pipeline CLI and pure helpers: bad input exits 2 with nothing written, fast failures, selection.

No Ray instance is needed here (the CLI fails before starting one).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run import EXIT, main
from pipeline.search import select_top_k
from pipeline.state import TrialOutcome
from pipeline.tracking import allowed_params
from pipeline.tracking_uri import redact_uri, resolve_tracking_uri
from pipeline.trials import trial_points, with_overrides
from rarn.config import ConfigError, TrackingConfig, config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["search.epochz=2"], "search.epochz"),
        (["search.epochs=two"], "search.epochs"),
        (["tune.param_space={search.nope: [1, 2]}"], "search.nope"),
        (["tune.param_space={search.seed: 3}"], "tune.param_space.search.seed"),
        (["evaluation.attacks=[pgd, nosuch]"], "nosuch"),
        (["retrain.genotype=NOPE"], "retrain.genotype"),
        (["tune.scheduler=hyperband"], "tune.scheduler"),
    ],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, overrides, needle):
    monkeypatch.chdir(tmp_path)
    rc = main(["--config", SMOKE, "--quiet", f"run_dir={tmp_path}/run", *overrides])
    assert rc == EXIT["usage"] == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run_dir, no mlflow.db


def test_bad_yaml_file_and_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  epochs: 1\nsurch:\n  x: 1\n")
    assert main(["--config", str(bad)]) == 2
    assert "surch" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_resume_needs_a_run_and_a_fresh_run_needs_an_empty_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", SMOKE, "--resume", f"run_dir={tmp_path}/run"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text("{}")
    assert main(["--config", SMOKE, f"run_dir={tmp_path}/run"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    rc = main(["--config", SMOKE, f"run_dir={tmp_path}/run", f"tracking.tracking_uri={uri}"])
    assert rc == EXIT["tracking"] == 3
    assert time.monotonic() - t0 < 30  # seconds, not MLflow's minutes of retries
    assert "unreachable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_both_entry_points_exit_2_on_a_bad_override(tmp_path):
    for cmd in (["pipeline/run.py"], ["-m", "pipeline.run"]):
        p = subprocess.run(
            [sys.executable, *cmd, "--config", SMOKE, f"run_dir={tmp_path}/r", "search.nope=1"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 2, p.stderr
        assert "search.nope" in p.stderr
    assert not (tmp_path / "r").exists()


def test_rarn_imports_neither_ray_nor_mlflow():
    code = (
        "import importlib, pkgutil, sys, rarn\n"
        "for m in pkgutil.iter_modules(rarn.__path__): importlib.import_module('rarn.' + m.name)\n"
        "bad = {'ray', 'mlflow'} & {k.split('.')[0] for k in sys.modules}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------
# Pure helpers


def test_trial_points_expand_grid_and_samples_with_stable_keys():
    cfg = load_config(SMOKE, ["tune.param_space={search.seed: [0, 1], search.arch_lr: [0.1]}"])
    pts = trial_points(cfg)
    assert [p["key"] for p in pts] == ["t00", "t01"]
    assert [p["search.seed"] for p in pts] == [0, 1]
    cfg = load_config(
        SMOKE, ["tune.param_space={search.arch_lr: [0.1, 0.2]}", "tune.num_samples=2"]
    )
    pts = trial_points(cfg)
    assert len(pts) == 4 and len({p["key"] for p in pts}) == 4
    assert [p.get("search.seed", 0) for p in pts] == [0, 0, 1, 1]  # repeats are new searches
    assert with_overrides(cfg, {"search.arch_lr": 0.2}).search.arch_lr == 0.2
    with pytest.raises(ConfigError, match="search.epochs"):
        with_overrides(cfg, {"search.epochs": "x"})


def test_select_top_k_skips_errored_and_incomplete_trials():
    def o(key, status, acc, complete=True, sha="s"):
        return TrialOutcome(key, {}, status, {"val_acc": acc}, complete, genotype_sha=sha)

    outs = [
        o("t0", "TERMINATED", 0.5),
        o("t1", "ERROR", 0.99),  # diverged: never selected, whatever its last metric
        o("t2", "TERMINATED", 0.9, complete=False),  # stopped early by ASHA
        o("t3", "TERMINATED", 0.7),
        o("t4", "TERMINATED", 0.95, sha=None),  # no genotype artifact
    ]
    assert select_top_k(outs, 2, "val_acc", "max") == ["t3", "t0"]
    assert select_top_k(outs, 5, "val_acc", "max") == ["t3", "t0", "t2"]
    assert select_top_k(outs, 1, "val_acc", "min") == ["t0"]
    assert TrialOutcome.from_dict(outs[0].to_dict()) == outs[0]


def test_params_allow_list_and_redaction(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE, ["tracking.tracking_uri=http://user:s3cret@host:5000"])
    params = allowed_params(config_to_dict(cfg))
    assert "search.epochs" in params and "tune.param_space" in params
    assert not [k for k in params if k.startswith(("tracking.", "run_dir"))]
    assert "data.path" not in params and "tune.storage_path" not in params
    assert not any("s3cret" in v for v in params.values())
    assert redact_uri("http://user:s3cret@host:5000/x") == "http://***@host:5000/x"
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    rel = resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x/m.db"), tmp_path)
    assert rel == f"sqlite:///{tmp_path}/x/m.db"
    with pytest.raises(ValueError, match="file stores"):
        resolve_tracking_uri(TrackingConfig(tracking_uri="file:///tmp/mlruns"), tmp_path)
