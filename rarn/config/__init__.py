"""Typed, frozen configuration: one dataclass per stage, loaded from YAML with dotted overrides.

``load_config("configs/default.yaml", ["search.epochs=2", "constraint.kappa=0.1"])`` returns a
:class:`Config`. YAML is merged onto the dataclass defaults; every key must exist and every value
must have the declared type (an ``int`` is accepted where a ``float`` is declared), lie in the
field's range and, for a choice, be one of the allowed values. Anything else raises
:class:`ConfigError`, whose message names the dotted key, the value and what is allowed; command
line front ends turn it into exit code 2. ``dump_config`` writes the resolved config back to YAML.

Rooms: :mod:`~rarn.config.schema` (the dataclasses, their ranges and choices),
:mod:`~rarn.config.rules` (checks across fields and against the library's registries),
:mod:`~rarn.config.build` (building from plain values, which is where everything is checked;
dotted-key replacement; the ``tune.param_space`` grid), :mod:`~rarn.config.files` (the strict
YAML reader and the one override parser).

Functions take the section they need (``SearchConfig``, ``ConstraintConfig``, ...), never the root.
"""

from __future__ import annotations

from rarn.config.build import (
    MAX_TRIALS,
    check,
    config_from_dict,
    config_to_dict,
    expand_param_space,
    set_dotted,
    study_points,
    with_overrides,
)
from rarn.config.files import (
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    parse_value,
)
from rarn.config.schema import (
    Augment,
    ChoiceError,
    Config,
    ConfigError,
    ConstraintConfig,
    DataConfig,
    DecodeRule,
    EvaluationConfig,
    GradNormMode,
    PerturbationEstimate,
    Range,
    RetrainConfig,
    RetrainImages,
    Schedule,
    SearchConfig,
    SelectMode,
    StudyConfig,
    TrackingConfig,
    TrainMethod,
    TuneConfig,
    TuneScheduler,
)

__all__ = [
    # loading and overrides
    "load_config",
    "dump_config",
    "apply_overrides",
    "parse_override",
    "parse_value",
    # building and checking
    "ConfigError",
    "ChoiceError",
    "check",
    "config_from_dict",
    "config_to_dict",
    "set_dotted",
    "study_points",
    "with_overrides",
    "expand_param_space",
    "MAX_TRIALS",
    # the schema: root, sections, intervals, choices
    "Config",
    "DataConfig",
    "SearchConfig",
    "ConstraintConfig",
    "RetrainConfig",
    "EvaluationConfig",
    "TuneConfig",
    "StudyConfig",
    "TrackingConfig",
    "Range",
    "Augment",
    "GradNormMode",
    "DecodeRule",
    "PerturbationEstimate",
    "TrainMethod",
    "Schedule",
    "TuneScheduler",
    "SelectMode",
    "RetrainImages",
]
