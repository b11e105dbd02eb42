"""Checks that run before anything is written: config values, the run directory, ``--resume``.

Everything here raises :class:`rarn.config.ConfigError` (the CLI's exit 2) and touches neither
Ray nor MLflow, so a bad value fails in seconds with nothing on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.state import STATE_FILE
from pipeline.trials import trial_points
from rarn.config import Config, ConfigError, config_to_dict, load_config

__all__ = ["check_run_dir", "config_diff", "validate_config"]


def validate_config(cfg: Config, stages: Sequence[str], resume: bool) -> None:
    """Every value the stages will use, checked in the driver (raises ConfigError)."""
    from rarn.data import DATASETS
    from rarn.nas.genotype import get_genotype
    from rarn.robust.attacks import ATTACKS
    from rarn.robust.loop import SCHEDULES
    from rarn.robust.steps import STEPS

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name {cfg.data.name!r}: known {', '.join(DATASETS)}")
    trial_points(cfg)
    t = cfg.tune
    checks = [
        (t.scheduler in ("none", "asha"), f"tune.scheduler {t.scheduler!r}: use none | asha"),
        (t.select_mode in ("max", "min"), f"tune.select_mode {t.select_mode!r}: use max | min"),
        (t.top_k >= 1, f"tune.top_k must be >= 1, got {t.top_k}"),
        (t.retrain_workers >= 1, f"tune.retrain_workers must be >= 1, got {t.retrain_workers}"),
        (t.max_failures >= 0, f"tune.max_failures must be >= 0, got {t.max_failures}"),
        (cfg.retrain.method in STEPS, f"retrain.method {cfg.retrain.method!r}: use {list(STEPS)}"),
        (cfg.retrain.schedule in SCHEDULES, f"retrain.schedule {cfg.retrain.schedule!r}"),
        (bool(cfg.evaluation.attacks), "evaluation.attacks must name at least one attack"),
        (cfg.tracking.alias.isidentifier(), f"tracking.alias {cfg.tracking.alias!r} is invalid"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for a in cfg.evaluation.attacks:
        if a not in ATTACKS:
            raise ConfigError(f"evaluation.attacks: unknown attack {a!r}; known {sorted(ATTACKS)}")
    if cfg.retrain.genotype == "searched":
        if "search" not in stages and "retrain" in stages and not resume:
            raise ConfigError("retrain.genotype=searched needs the search stage (or --resume)")
    else:
        try:
            get_genotype(cfg.retrain.genotype)
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"retrain.genotype: {e}") from None


def check_run_dir(cfg: Config, resume: bool) -> Path:
    """The absolute run directory: empty (or absent) for a new run; for ``--resume`` one that
    holds a run whose stored config equals ``cfg``."""
    run_dir = Path(cfg.run_dir).resolve()
    if resume and not (run_dir / STATE_FILE).is_file():
        raise ConfigError(f"--resume: no run to resume in {run_dir}")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run_dir {run_dir} holds a previous run: pass --resume to continue it, or "
            "run_dir=<new folder> to start another"
        )
    if resume:
        stored = load_config(run_dir / "config.yaml")
        diff = config_diff(config_to_dict(stored), config_to_dict(cfg))
        if diff:
            raise ConfigError(f"--resume: config differs from {run_dir}/config.yaml: {diff}")
    return run_dir


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (``tune.param_space`` compared as one value)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) and k != "param_space":
            keys += config_diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys
