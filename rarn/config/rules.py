"""The checks no single field can declare: relations between fields, and registry names.

Intervals and closed choices sit on the fields (:mod:`rarn.config.schema`); what needs two fields
lives here, one function per section. A check against a library registry (datasets, attacks,
genotypes, baselines) lives beside that registry, registered with :func:`registry_rule`:
``rarn.config`` imports no other ``rarn`` room. The package root names the modules holding such
rules (:func:`rule_modules`); they are imported when a config is first checked, not when
``rarn.config`` is imported, so ``import rarn.config`` stays cheap.
"""

from __future__ import annotations

import importlib
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from rarn.config.schema import (
    ChoiceError,
    Config,
    ConfigError,
    ConstraintConfig,
    DataConfig,
    EvaluationConfig,
    RetrainConfig,
    SearchConfig,
    StudyConfig,
    TrackingConfig,
    TuneConfig,
)
from rarn.config.variants import variant_overrides

__all__ = ["check_rules", "choice_error", "registry_rule", "rule_modules", "short_repr"]

_Rule = TypeVar("_Rule", bound=Callable[[Any], None])

# Searches differ only in these sections; the data and the later stages are shared by all trials.
TRIAL_SECTIONS = ("search", "constraint")


def choice_error(key: str, value: Any, allowed: Iterable[str]) -> ChoiceError:
    """The one message for a value outside a closed or registry-backed choice."""
    return ChoiceError(
        f"{key}: {short_repr(value)} not allowed; must be one of: {', '.join(allowed)}"
    )


def short_repr(value: Any) -> str:
    """``repr`` cut to 80 characters: messages stay readable whatever was pasted."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _data(d: DataConfig) -> None:
    if d.sha256 and (len(d.sha256) != 64 or d.sha256.strip("0123456789abcdef")):
        raise ConfigError(
            f"data.sha256: {short_repr(d.sha256)} not allowed; must be 64 lower-case hex digits "
            "(sha256sum of data.path) or empty"
        )
    if d.retrain_images == "disjoint" and d.limit == 0:
        raise ConfigError(
            "data.limit: 0 (all training images for the search) not allowed with "
            "data.retrain_images=disjoint; the retraining would get none"
        )
    if d.retrain_images == "search" and d.retrain_limit:
        raise ConfigError(
            f"data.retrain_limit: {d.retrain_limit} not allowed with data.retrain_images=search "
            "(the retraining uses the search's images); set data.retrain_images=disjoint"
        )


def _search(s: SearchConfig) -> None:
    if s.init_channels % (2 * s.partial_channels):
        raise ConfigError(
            f"search.init_channels: {s.init_channels} not allowed; must be a multiple of "
            f"2 * search.partial_channels = {2 * s.partial_channels}"
        )
    if s.sigma_min > s.sigma_max:
        raise ConfigError(
            f"search.sigma_min: {s.sigma_min!r} not allowed; must be <= search.sigma_max "
            f"= {s.sigma_max!r}"
        )


def _constraint(c: ConstraintConfig) -> None:
    if c.estimator == "monte_carlo" and c.mc_samples < 2:
        raise ConfigError(
            f"constraint.mc_samples: {c.mc_samples} not allowed; must be >= 2 with "
            "constraint.estimator=monte_carlo (a standard deviation needs two samples)"
        )


def _retrain(r: RetrainConfig) -> None:
    # the names of retrain.genotype and retrain.baselines: rarn.models.baselines' registry rule
    if len(set(r.baselines)) < len(r.baselines):
        raise ConfigError(f"retrain.baselines: {list(r.baselines)!r} repeats a name")
    if r.val_fraction > 0 and r.val_steps < 1:
        raise ConfigError(
            f"retrain.val_steps: {r.val_steps} not allowed; must be >= 1 when "
            f"retrain.val_fraction > 0 (the selection attack)"
        )


def _study(s: StudyConfig) -> None:
    for name, overrides in s.define.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"study.define.{name}: expected a mapping of dotted overrides")
        for key in overrides:
            if not isinstance(key, str) or key.split(".")[0] not in TRIAL_SECTIONS:
                raise ConfigError(
                    f"study.define.{name}: {key!r} not allowed; only "
                    f"{' and '.join(TRIAL_SECTIONS)} keys vary between variants"
                )
    for i, name in enumerate(s.variants):
        try:
            variant_overrides(name, s.define)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"study.variants[{i}]: {e.args[0]}") from None
    for key, values in (("variants", s.variants), ("seeds", s.seeds)):
        if len(set(values)) < len(values):
            raise ConfigError(f"study.{key}: {list(values)!r} repeats a value")
    if s.variants and not s.seeds:
        raise ConfigError("study.seeds: [] not allowed; a study needs at least one seed")


def _tune(t: TuneConfig) -> None:
    if not t.select_metric:
        raise ConfigError("tune.select_metric: '' not allowed; name a reported metric")
    for key, values in t.param_space.items():
        if not isinstance(key, str):
            raise ConfigError(f"tune.param_space: {key!r} not allowed; keys are dotted config keys")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"tune.param_space.{key}: expected a non-empty list of values, got {values!r}"
            )
        if key.split(".")[0] not in TRIAL_SECTIONS:
            raise ConfigError(
                f"tune.param_space: {key} not allowed; only {' and '.join(TRIAL_SECTIONS)} keys "
                "vary between search trials"
            )
        if len({repr(v) for v in values}) < len(values):
            raise ConfigError(f"tune.param_space.{key}: {values!r} repeats a value")


def _tracking(t: TrackingConfig) -> None:
    for key in ("experiment", "registered_model"):
        if not getattr(t, key):
            raise ConfigError(f"tracking.{key}: '' not allowed; give it a name")
    if not t.alias.isidentifier():
        raise ConfigError(f"tracking.alias: {t.alias!r} not allowed; must be a Python identifier")
    # The model registry's own rules (MLflow refuses these only when the alias is set, after
    # the whole run): 'latest' and version-like names are reserved, names are not paths.
    if t.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", t.alias) or len(t.alias) > 255:
        raise ConfigError(
            f"tracking.alias: {t.alias!r} not allowed; 'latest' (any case) and v<digits> are "
            "reserved by the model registry (at most 255 characters)"
        )
    name = t.registered_model
    normalised = posixpath.normpath(name)
    if (not name.strip() or "/" in name or ":" in name or normalised != name or name == "."
            or name.startswith("..") or len(name) > 256):  # fmt: skip
        raise ConfigError(
            f"tracking.registered_model: {name!r} not allowed; the model registry refuses '/', "
            "':', blank names and path-like names ('.', '..')"
        )


def _config(c: Config) -> None:
    if not c.run_dir:
        raise ConfigError("run_dir: '' not allowed; give the run a folder")
    if c.study.variants and (c.tune.param_space or c.tune.num_samples > 1):
        raise ConfigError(
            "tune.param_space / tune.num_samples: not allowed with study.variants (the study's "
            "trials are its variants x study.seeds); remove them"
        )
    robust = c.search.robust_eval_every > 0
    if c.tune.select_metric == "val_pgd_acc" and not robust:
        raise ConfigError(
            "tune.select_metric: val_pgd_acc needs search.robust_eval_every >= 1 (it is never "
            "measured with 0)"
        )
    if c.tune.scheduler == "asha" and c.tune.grace_period > c.search.epochs:
        raise ConfigError(
            f"tune.grace_period: {c.tune.grace_period} not allowed; ASHA needs it <= "
            f"search.epochs = {c.search.epochs}"
        )


_RULES: dict[type, Callable[[Any], None]] = {
    DataConfig: _data,
    SearchConfig: _search,
    ConstraintConfig: _constraint,
    RetrainConfig: _retrain,
    EvaluationConfig: lambda e: None,  # its entries: the attack registry's own rule (named.py)
    TuneConfig: _tune,
    StudyConfig: _study,
    TrackingConfig: _tracking,
    Config: _config,
}


_REGISTRY_RULES: dict[type, list[Callable[[Any], None]]] = {}
_PENDING: list[str] = []  # modules named by rule_modules, not imported yet


def registry_rule(section: type) -> Callable[[_Rule], _Rule]:
    """Register ``rule(section_value)`` as a check of ``section`` against a library registry.

    The module that owns the registry registers the check beside it, e.g. ``data.name`` in
    :mod:`rarn.data.sources`; it runs before the section's cross-field rules.
    """
    if section not in _RULES:
        raise TypeError(f"registry_rule: {section!r} is not a config section")

    def register(rule: _Rule) -> _Rule:
        _REGISTRY_RULES.setdefault(section, []).append(rule)
        return rule

    return register


def rule_modules(*names: str) -> None:
    """Name the modules that register registry rules (the package root does, once); each is
    imported when a config is next checked."""
    _PENDING.extend(names)


def check_rules(obj: Any) -> None:
    """Run the registry and cross-field rules of one built section (or of the root config)."""
    while _PENDING:
        importlib.import_module(_PENDING.pop(0))
    for rule in _REGISTRY_RULES.get(type(obj), ()):
        rule(obj)
    _RULES[type(obj)](obj)
