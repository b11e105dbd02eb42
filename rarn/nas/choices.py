"""The chance constraint's config names, checked against the library's tables.

``constraint.estimator``, ``bound``, ``mixture``, ``threshold`` and ``balance`` are plain names
in the schema; their one list of allowed values is the registry that implements them
(:data:`~rarn.nas.constraint.ESTIMATORS`, :data:`~rarn.nas.constraint.BOUNDS`,
:data:`~rarn.nas.constraint.MIXTURES`, :data:`~rarn.nas.constraint.THRESHOLDS`,
:data:`~rarn.nas.balance.BALANCES`). This rule runs when a config is built, so an unknown name is
an exit 2 naming the key and every known entry, and a new entry needs no other file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rarn.config import ConstraintConfig
from rarn.config.rules import choice_error, registry_rule
from rarn.nas.balance import BALANCES
from rarn.nas.constraint import BOUNDS, ESTIMATORS, MIXTURES, THRESHOLDS

__all__ = ["CONSTRAINT_CHOICES"]

CONSTRAINT_CHOICES: dict[str, Mapping[str, Any]] = {
    "estimator": ESTIMATORS,
    "bound": BOUNDS,
    "mixture": MIXTURES,
    "threshold": THRESHOLDS,
    "balance": BALANCES,
}
"""Field of the ``constraint`` section -> the registry its value names."""


@registry_rule(ConstraintConfig)
def _known_choices(c: ConstraintConfig) -> None:
    for key, table in CONSTRAINT_CHOICES.items():
        if getattr(c, key) not in table:
            raise choice_error(f"constraint.{key}", getattr(c, key), table)
