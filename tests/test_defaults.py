"""One set of defaults (issue 18): a library object described by a config section defaults to
that section's defaults, so a library user who builds it directly gets the config user's method.

Each case names a library callable, its config section and the parameters whose names differ
from the section's fields; every parameter with a default whose field exists is compared by
introspecting the signature.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from rarn.config import ConstraintConfig, EvaluationConfig, RetrainConfig, SearchConfig
from rarn.lipschitz.estimator import LipschitzEstimator
from rarn.models.darts import build_network
from rarn.nas.collapse import CollapseLimits
from rarn.nas.constraint import ChanceConstraint
from rarn.nas.supernet import Supernet
from rarn.robust.evaluation import SuiteSettings
from rarn.robust.evaluation.transfer import transfer_matrix
from rarn.robust.loop import make_scheduler
from rarn.robust.steps import fast_step, pgd_step, trades_step

# (library callable, its config section, {parameter: field, or None where the parameter has no
# field of its own and is checked separately})
CASES: list[tuple[Callable[..., Any], type, dict[str, str | None]]] = [
    (ChanceConstraint, ConstraintConfig, {"relative": None}),
    (SuiteSettings, EvaluationConfig, {}),
    (LipschitzEstimator, ConstraintConfig, {}),
    (
        CollapseLimits,
        SearchConfig,
        {
            "param_free": "collapse_param_free_limit",
            "dominant_op": "collapse_dominant_limit",
            "lambda_ranking": "collapse_lambda_limit",
        },
    ),
    (Supernet, SearchConfig, {"C": "init_channels", "k": "partial_channels"}),
    (build_network, RetrainConfig, {"C": "init_channels"}),
    (pgd_step, RetrainConfig, {}),
    (trades_step, RetrainConfig, {"beta": "trades_beta"}),
    (fast_step, RetrainConfig, {"step_size": None}),  # None: FGSM-RS's 1.25 eps
    (make_scheduler, RetrainConfig, {}),
    (transfer_matrix, EvaluationConfig, {}),
]


def _defaults(section: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("fn, section, renames", CASES, ids=[c[0].__name__ for c in CASES])
def test_library_defaults_are_the_config_defaults(
    fn: Callable[..., Any], section: type, renames: dict[str, str | None]
) -> None:
    fields = _defaults(section)
    compared, differ = [], []
    for p in inspect.signature(fn).parameters.values():
        field = renames.get(p.name, p.name)
        if p.default is inspect.Parameter.empty or field is None or field not in fields:
            continue
        default = p.default
        if isinstance(default, list):
            default = tuple(default)
        compared.append(p.name)
        if default != fields[field]:
            got = fields[field]
            differ.append(f"{p.name}={p.default!r} but {section.__name__}.{field}={got!r}")
    if dataclasses.is_dataclass(fn):  # default_factory fields do not show in the signature
        for f in dataclasses.fields(fn):
            field = renames.get(f.name, f.name)
            if f.default_factory is not dataclasses.MISSING and field in fields:
                compared.append(f.name)
                if f.default_factory() != fields[field]:
                    differ.append(f"{f.name} differs from {section.__name__}.{field}")
    assert compared, f"{fn.__name__} shares no default with {section.__name__}"
    assert not differ, f"{fn.__name__}: " + "; ".join(differ)


def test_objects_built_from_the_default_config_are_the_default_objects() -> None:
    built = ChanceConstraint.from_config(ConstraintConfig())
    assert vars(built) == vars(ChanceConstraint())
    suite = SuiteSettings.from_config(EvaluationConfig())
    plain = SuiteSettings()
    for f in dataclasses.fields(SuiteSettings):
        if f.name not in ("attacks", "main_attack"):  # resolved entries / the suite's first PGD
            assert getattr(suite, f.name) == getattr(plain, f.name), f.name
    assert [a.name for a in suite.attacks] == list(plain.attacks)
    assert suite.main_attack == plain.main_attack
    assert CollapseLimits.of(SearchConfig()) == CollapseLimits()
