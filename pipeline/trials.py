"""The search's param space as explicit trial points with stable keys (``t00``, ``t01``, ...).

A trial's MLflow run, its folder and its checkpoints are found again after any restart by its
key, so the grid is expanded here rather than by Ray Tune. Every point is validated in the
driver, before Ray starts, through :func:`rarn.config.apply_overrides` (the one override parser
of the library and the pipeline) and :func:`rarn.config.config_from_dict`.

This module imports neither Ray nor MLflow: the CLI's pre-flight checks use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import yaml

from rarn.config import (
    Config,
    ConfigError,
    TuneConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)

__all__ = ["trial_points", "with_overrides"]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # a value repeated in a list: no YAML anchors
        return True


def _override(key: str, value: Any) -> str:
    """``key=<value as YAML>``: the text form :func:`apply_overrides` parses back to ``value``."""
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=1 << 30).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def with_overrides(cfg: Config, point: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted keys (``search.seed``) replaced, validated like the YAML.

    Raises:
        ConfigError: unknown key or wrong type (the message names ``tune.param_space``).
    """
    try:
        values = apply_overrides(config_to_dict(cfg), [_override(k, v) for k, v in point.items()])
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"tune.param_space: {e}") from None


def trial_points(cfg: Config) -> list[dict[str, Any]]:
    """The grid of ``tune.param_space`` times ``tune.num_samples``, each with a stable ``key``.

    Repeats (``num_samples > 1``) shift ``search.seed`` by the repeat index unless the seed is
    itself swept, so repeated trials are different searches. Every point is validated.

    Raises:
        ConfigError: an unknown key, a wrong value type, or an empty grid axis.
    """
    t: TuneConfig = cfg.tune
    if t.num_samples < 1:
        raise ConfigError(f"tune.num_samples must be >= 1, got {t.num_samples}")
    keys = sorted(t.param_space)
    for k in keys:
        if not isinstance(t.param_space[k], list) or not t.param_space[k]:
            raise ConfigError(f"tune.param_space.{k}: expected a non-empty list of values")
    combos = [dict(zip(keys, v)) for v in itertools.product(*(t.param_space[k] for k in keys))]
    points = []
    for rep in range(t.num_samples):
        for combo in combos:
            point = dict(combo)
            if rep and "search.seed" not in point:
                point["search.seed"] = cfg.search.seed + rep
            with_overrides(cfg, point)  # validate now, in the driver
            points.append({"key": f"t{len(points):02d}", **point})
    return points
