"""The search's param space as explicit trial points with stable keys (``t00``, ``t01``, ...).

A trial's MLflow run, its folder and its checkpoints are found again after any restart by its
key, so the grid is expanded by :func:`rarn.config.expand_param_space` (checked at config load,
at most ``MAX_TRIALS`` points) rather than by Ray Tune, and each point becomes a config through
:func:`rarn.config.with_overrides`, the one override path of the library and the pipeline.

In study mode (``study.variants``) the trials are the variants x ``study.seeds`` of
:func:`rarn.config.study_points`, keyed ``<variant>-s<seed>`` and carrying their variant's name
under :data:`VARIANT` (not a config key: :func:`overrides_of` drops it).

This module imports neither Ray nor MLflow: the CLI's pre-flight checks use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rarn.config import Config, ConfigError, expand_param_space, study_points
from rarn.config import with_overrides as _with_overrides

__all__ = ["VARIANT", "overrides_of", "trial_points", "with_overrides"]

VARIANT = "variant"
_META = ("key", VARIANT)


def with_overrides(cfg: Config, point: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted keys (``search.seed``) replaced, validated like the YAML.

    Raises:
        ConfigError: unknown key, wrong type or value (the message names ``tune.param_space``).
    """
    try:
        return _with_overrides(cfg, overrides_of(point))
    except ConfigError as e:
        raise ConfigError(f"tune.param_space: {e}") from None


def overrides_of(point: Mapping[str, Any]) -> dict[str, Any]:
    """A trial point's config overrides (without its key and variant name)."""
    return {k: v for k, v in point.items() if k not in _META}


def trial_points(cfg: Config) -> list[dict[str, Any]]:
    """The grid of ``tune.param_space`` times ``tune.num_samples``, each with a stable ``key``;
    in study mode the variants x seeds, keyed ``<variant>-s<seed>`` with their ``variant``."""
    if cfg.study.variants:
        return [{"key": f"{v}-s{p['search.seed']}", VARIANT: v, **p} for v, p in study_points(cfg)]
    return [{"key": f"t{i:02d}", **p} for i, p in enumerate(expand_param_space(cfg))]
