"""Named attacks: each entry of a suite is a registry attack with its own parameters.

A suite is a list of entries, run in order. An entry is a registry name (``"pgd"``: the attack
with the suite's shared ``eps``, ``step_size`` and ``steps``) or a mapping that names it and sets
its own parameters, so that PGD-20 and PGD-100 run side by side::

    {"name": "pgd100", "attack": "pgd", "steps": 100}
    {"name": "cw30", "attack": "cw", "steps": 30, "kappa": 50.0}
    {"name": "aa", "attack": "autoattack", "n": 200}

``n`` limits an entry to the first ``n`` evaluated images (the same images for every model):
a recorded, deterministic subset for the expensive attacks, never fewer iterations.
``survivors`` runs an entry only on the images of its subset that no earlier entry fooled (the
reference AutoAttack's own early exit: an image already fooled is not robust whatever a later
attack does, so the worst case is the same); its accuracy is then robust to it *and* to every
earlier entry. It defaults to true for the AutoAttack family (:data:`SURVIVORS_BY_DEFAULT`), the
suite's most expensive entries, and to false for every other attack::

    {"name": "aa", "attack": "autoattack", "n": 100, "survivors": false}

Every other
key is a keyword argument of the attack (``rarn.robust.attacks``), checked here against the
attack's signature, its type and its range (``eps`` against the attack's threat model). The
config (``evaluation.attacks`` / ``evaluation.suite``) and :class:`SuiteSettings` both go through
:func:`named_suite`, so an entry is valid in a YAML file exactly when it is in Python.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rarn.config import EvaluationConfig
from rarn.config.rules import choice_error, registry_rule, short_repr
from rarn.config.schema import ITERATIONS, NON_NEGATIVE, ChoiceError, ConfigError, Range
from rarn.robust.attacks import ATTACKS, attack_spec
from rarn.robust.attacks.external import AUTOATTACK_VERSIONS

__all__ = [
    "EPS_RANGE",
    "PARAM_RANGES",
    "SURVIVORS_BY_DEFAULT",
    "NamedAttack",
    "config_suite",
    "named_attack",
    "named_suite",
]

EPS_RANGE: dict[str, Range] = {
    "linf": Range(0, 1, "(]"),  # images lie in [0, 1]: a larger L-inf ball is the whole cube
    "l2": Range(0, 512, "(]"),  # above the diameter of [0, 1]^d for a 3x256x256 image (443)
}
"""Threat model -> allowed ``eps`` (and ``step_size``) of its attacks."""

PARAM_RANGES: dict[str, Range | tuple[str, ...]] = {
    "steps": ITERATIONS,
    "n": Range(0, 10**9),  # 0: every image
    "decay": NON_NEGATIVE,  # MIM's momentum decay
    "kappa": NON_NEGATIVE,  # CW's margin confidence (inf: no clamp)
    "n_iter": ITERATIONS,  # AutoAttack's APGD/FAB iterations
    "n_queries": Range(1, 1_000_000),  # AutoAttack's Square queries
    "p_init": Range(0, 1, "(]"),  # Square's initial fraction of pixels
    "version": AUTOATTACK_VERSIONS,  # AutoAttack's composition
    "samples": Range(1, 10_000),  # EOT's forward passes per step
}
"""Parameter -> its range (or choices), whichever attack it belongs to."""

SURVIVORS_BY_DEFAULT: tuple[str, ...] = ("autoattack", "autoattack_l2", "autoattack_torchattacks")
"""The attacks whose entries run on the survivors of the earlier ones unless they say otherwise:
the AutoAttack family (each its own early exit, and by far the suite's most expensive)."""

_RESERVED = ("clean", "worst_case")  # row labels of the results tables
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # also an MLflow metric name: eval_<name>_acc
_SHARED = {"eps": float, "step_size": float, "steps": int}


@dataclass(frozen=True)
class NamedAttack:
    """One entry of a suite, resolved: what runs, under which name, with which arguments.

    Attributes:
        name: unique within the suite; the ``attack`` column of the results tables.
        attack: the registry key (:data:`rarn.robust.attacks.ATTACKS`).
        params: every keyword argument it is called with (``eps``, ``step_size``, ``steps`` and
            the attack's own, e.g. MIM's ``decay``), the suite's shared ones filled in.
        n: only the first ``n`` evaluated images (0: all of them).
        survivors: only the images of its subset that no earlier entry of the suite fooled
            (None: the attack's default, true for :data:`SURVIVORS_BY_DEFAULT`).
    """

    name: str
    attack: str
    params: Mapping[str, Any] = field(default_factory=dict)
    n: int = 0
    survivors: bool | None = None

    def __post_init__(self) -> None:  # None: the attack's default, resolved once
        if self.survivors is None:
            object.__setattr__(self, "survivors", self.attack in SURVIVORS_BY_DEFAULT)

    def subset(self, total: int) -> int:
        """How many of ``total`` images it runs on (the first ones)."""
        return total if self.n == 0 else min(self.n, total)


def _allowed(attack: str) -> dict[str, Any]:
    """The keys an entry of ``attack`` may set, with their defaults (None: no default)."""
    own = {"n": 0, "survivors": attack in SURVIVORS_BY_DEFAULT}
    return {**dict.fromkeys(_SHARED), **own, **attack_spec(attack).settings({})}


def _check_value(key: str, name: str, value: Any, default: Any, attack: str) -> Any:
    """``value`` of the parameter ``name``: its type (that of the default) and its range."""
    tp = _SHARED.get(name) or (type(default) if default is not None else None)
    if name == "n":
        tp = int
    bad = (
        (tp is bool and not isinstance(value, bool))
        or (tp is int and (isinstance(value, bool) or not isinstance(value, int)))
        or (tp is float and (isinstance(value, bool) or not isinstance(value, (int, float))))
        or (tp is str and not isinstance(value, str))
    )
    if bad:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {short_repr(value)}")
    if tp is float:
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not _is_inf(default)):
            raise ConfigError(f"{key}: expected a finite float, got {short_repr(value)}")
    allowed = PARAM_RANGES.get(name)
    if name in ("eps", "step_size"):
        allowed = EPS_RANGE[attack_spec(attack).norm]
    if isinstance(allowed, Range) and value not in allowed:
        raise ConfigError(f"{key}: {short_repr(value)} not allowed; must be {allowed}")
    if isinstance(allowed, tuple) and value not in allowed:
        raise choice_error(key, value, allowed)
    return value


def _is_inf(v: Any) -> bool:
    return isinstance(v, float) and math.isinf(v)


def _as_mapping(entry: Any, key: str) -> dict[str, Any]:
    """An entry as a mapping: a registry name is ``{"name": it, "attack": it}``."""
    if isinstance(entry, NamedAttack):
        own = {"n": entry.n, "survivors": entry.survivors}
        return {"name": entry.name, "attack": entry.attack, **entry.params, **own}
    if isinstance(entry, str):
        return {"name": entry, "attack": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key}: expected an attack name or a mapping, got {short_repr(entry)}")
    entry = dict(entry)
    entry.setdefault("attack", entry.get("name"))
    entry.setdefault("name", entry["attack"])
    return entry


def _resolve(entry: dict[str, Any], shared: Mapping[str, Any], key: str) -> NamedAttack:
    """One entry (from :func:`_as_mapping`) checked and resolved."""
    attack, name = entry.pop("attack"), entry.pop("name")
    if attack is None:
        raise ConfigError(f"{key}: no 'attack'; name one of: {', '.join(ATTACKS)}")
    if attack not in ATTACKS:
        where = f"{key}.attack" if name != attack else key
        known = ", ".join(ATTACKS)
        raise ChoiceError(f"{where}: unknown attack {short_repr(attack)}; known: {known}")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise ConfigError(
            f"{key}.name: {short_repr(name)} not allowed; letters, digits, '_', '.', '-', "
            f"and not {' or '.join(_RESERVED)}"
        )
    allowed = _allowed(attack)
    for k in entry:
        if k not in allowed:
            raise ConfigError(
                f"{key}: unknown parameter {k!r} of attack {attack!r}; it takes: "
                f"{', '.join(allowed)}"
            )
    params = {**{k: shared[k] for k in _SHARED}, **entry}
    checked = {k: _check_value(f"{key}.{k}", k, v, allowed[k], attack) for k, v in params.items()}
    n, survivors = checked.pop("n", 0), checked.pop("survivors", None)
    return NamedAttack(name, attack, checked, n, survivors)


def named_attack(
    entry: Any,
    shared: Mapping[str, Any],
    *,
    key: str = "attack",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> NamedAttack:
    """One entry of a suite (see :func:`named_suite`), checked and resolved."""
    m = _as_mapping(entry, key)
    extra = (overrides or {}).get(m["name"], {}) if isinstance(m["name"], str) else {}
    return _resolve({**m, **extra}, shared, key)


def named_suite(
    entries: Sequence[Any],
    shared: Mapping[str, Any],
    *,
    keys: Sequence[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    label: str = "attacks",
) -> tuple[NamedAttack, ...]:
    """Check and resolve the entries of a suite, in order.

    Args:
        entries: registry names, mappings (``name``, ``attack``, ``n``, ``survivors`` and the
            attack's keyword arguments) or :class:`NamedAttack` records.
        shared: the suite's ``eps``, ``step_size`` and ``steps``, for what an entry leaves out.
        keys: a label per entry for the messages (default ``attacks[i]``), e.g. the config's
            ``evaluation.suite[2]``.
        overrides: name -> keyword arguments replacing an entry's (``SuiteSettings.attack_kwargs``).
        label: what the messages call the whole suite (e.g. ``evaluation.attacks``).

    Returns:
        One :class:`NamedAttack` per entry.

    Raises:
        ConfigError: (a ValueError) an unknown parameter, a value of the wrong type or outside its
            range, a name listed twice, no entry, or no white-box attack among them.
        ChoiceError: (also a KeyError) an unknown attack, listing the known ones.
    """
    keys = list(keys) if keys is not None else [f"attacks[{i}]" for i in range(len(entries))]
    if not entries:
        raise ConfigError(f"{label}: [] not allowed; name at least one attack")
    out: list[NamedAttack] = []
    for entry, key in zip(entries, keys, strict=True):
        a = named_attack(entry, shared, key=key, overrides=overrides)
        if any(a.name == b.name for b in out):
            raise ConfigError(f"{key}: the name {a.name!r} is listed twice; names must be unique")
        out.append(a)
    if not any(attack_spec(a.attack).white_box for a in out):
        raise ConfigError(
            f"{label}: {[a.name for a in out]} has no white-box attack; black-box attacks alone "
            "cannot show gradient masking (add e.g. 'pgd')"
        )
    return tuple(out)


def config_suite(ev: Any) -> tuple[list[Any], list[str]]:
    """The entries of an :class:`~rarn.config.EvaluationConfig` and their config keys, in order.

    ``evaluation.attacks`` (registry names, the shorthand), then AutoAttack if the older switch
    ``evaluation.autoattack`` is on, then ``evaluation.suite`` (named entries with their own
    parameters).
    """
    entries = [*ev.attacks, *(["autoattack"] if ev.autoattack else []), *ev.suite]
    keys = [f"evaluation.attacks[{i}]" for i in range(len(ev.attacks))]
    keys += ["evaluation.autoattack"] * ev.autoattack
    keys += [f"evaluation.suite[{j}]" for j in range(len(ev.suite))]
    return entries, keys


@registry_rule(EvaluationConfig)
def _known_attacks(e: EvaluationConfig) -> None:
    """Every entry of ``evaluation.attacks``/``evaluation.suite``, checked at config build."""
    entries, keys = config_suite(e)
    shared = {"eps": e.eps, "step_size": e.step_size, "steps": e.steps}
    label = "evaluation.suite" if e.suite else "evaluation.attacks"
    named_suite(entries, shared, keys=keys, label=label)
