"""Checks that run before anything is written: config values, the run directory, ``--resume``.

Everything here raises :class:`rarn.config.ConfigError` (the CLI's exit 2) and touches neither
Ray nor MLflow, so a bad value fails in seconds with nothing on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.state import STATE_FILE
from rarn.config import Config, ConfigError, config_to_dict, load_config

__all__ = ["check_run_dir", "config_diff", "validate_config"]


def validate_config(cfg: Config, stages: Sequence[str], resume: bool) -> None:
    """What only the pipeline knows, checked in the driver (raises ConfigError).

    Every value rule of the config itself (types, ranges, choices, registries, the trial grid)
    already ran in :func:`rarn.config.load_config`; what is left depends on the stages run.
    """
    from rarn.nas.genotype import get_genotype

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
