"""Building a config from plain values, which is where every value is checked.

``config_from_dict`` (behind ``load_config``, overrides and ``with_overrides``) coerces each value
to its declared type, rejects it outside its ``Range`` or ``Literal`` choice, then runs the rules
of :mod:`rarn.config.rules`; a bad value fails here, at load time, naming its dotted key and what
is allowed, never later inside a Ray trial. :func:`check` runs the same checks on a config built
directly in Python (``SearchConfig(epochs=0)``), for library entry points.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from rarn.config.rules import check_rules, choice_error, short_repr
from rarn.config.schema import SEED, Config, ConfigError, Range
from rarn.config.variants import variant_overrides

__all__ = [
    "MAX_TRIALS",
    "check",
    "config_from_dict",
    "config_to_dict",
    "expand_param_space",
    "set_dotted",
    "study_points",
    "with_overrides",
]

MAX_TRIALS = 256
"""Most trials ``tune.param_space`` x ``tune.num_samples`` may ask for (one search each)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        value = _coerce(value, base, key)
        for bound in meta:
            if isinstance(bound, Range) and value not in bound:
                raise ConfigError(f"{key}: {short_repr(value)} not allowed; must be {bound}")
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise choice_error(key, value, allowed)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = _fields(value)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{key}: expected a mapping (section {tp.__name__}), got {short_repr(value)}"
            )
        return _build(tp, value, key + ".")
    return _coerce_plain(value, tp, key)


def _coerce_plain(value: Any, tp: Any, key: str) -> Any:
    """Scalars and containers: bool, int, float (finite), str, tuple[T, ...], list, dict."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {short_repr(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite float, got {short_repr(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {short_repr(value)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {short_repr(value)}")
        if origin is list:
            return list(value)
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {short_repr(value)}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _build(cls: type, values: Mapping[str, Any], prefix: str = "", trials: bool = True) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    for k in values:
        if not isinstance(k, str) or k not in names:
            raise ConfigError(
                f"unknown config key {prefix}{k!s}; {cls.__name__} has: {', '.join(sorted(names))}"
            )
    hints = _hints(cls)
    obj = cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})
    check_rules(obj)
    if cls is Config and trials:
        _check_trials(obj)
    return obj


def check(obj: Any) -> None:
    """Raise :class:`ConfigError` unless a config or one of its sections, however built, is valid.

    Configs from :func:`config_from_dict` are already checked; this is for sections built directly
    in Python, e.g. by a library entry point that received one.
    """
    _build(type(obj), _fields(obj), "" if isinstance(obj, Config) else _section_of(type(obj)))


def _section_of(cls: type) -> str:
    names = [f.name for f in dataclasses.fields(Config) if _hints(Config)[f.name] is cls]
    if not names:
        raise TypeError(f"check: {cls.__name__} is not a config section")
    return names[0] + "."


def config_from_dict(values: Mapping[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested mappings (e.g. parsed YAML), strictly."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"the top level must be a mapping of sections, got {short_repr(values)}")
    return _build(Config, values or {})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that :func:`config_from_dict` reads back."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``values[a][b] = value`` for ``dotted="a.b"`` in place, checking the key exists.

    Keys are checked against the dataclass tree here, so a typo fails even when it would only
    create a new nested mapping. Mappings along the path are copied, never shared with the caller.
    """
    path = dotted.split(".")
    cls: Any = Config
    node = values
    for depth, part in enumerate(path):
        key = ".".join(path[: depth + 1])
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(
                f"unknown config key {dotted}; {cls.__name__} has: {', '.join(names)}"
            )
        tp = _hints(cls)[part]
        if depth == len(path) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key {key}.{path[depth + 1]}: {key} is not a section")
        child = node.get(part, {})
        if not isinstance(child, Mapping):
            raise ConfigError(
                f"{key}: expected a mapping (section {tp.__name__}), got {short_repr(child)}"
            )
        node[part] = dict(child)
        node, cls = node[part], tp


def with_overrides(cfg: Config, point: Mapping[str, Any]) -> Config:
    """``cfg`` with dotted keys (``{"search.seed": 3}``) replaced, checked like the YAML.

    The ``tune.param_space`` grid is re-checked only when the point changes a ``tune`` key: a
    trial's point is one of the grid's, and every trial re-expanding the grid would cost
    ``MAX_TRIALS`` builds each.
    """
    values = config_to_dict(cfg)
    for dotted, value in point.items():
        set_dotted(values, dotted, value)
    return _build(Config, values, trials=any(k.split(".")[0] == "tune" for k in point))


def expand_param_space(cfg: Config) -> list[dict[str, Any]]:
    """The trial points of ``tune.param_space`` x ``tune.num_samples``, in a stable order.

    The grid runs over the sorted keys (``itertools.product`` order), once per repeat; repeats
    after the first shift ``search.seed`` by the repeat index unless the seed is swept, so
    repeated trials are different searches. Each point is a ``{dotted key: value}`` dict for
    :func:`with_overrides`; the first repeat of an empty grid is ``{}``.

    Raises:
        ConfigError: more than :data:`MAX_TRIALS` points (checked before expanding).
    """
    if cfg.study.variants:
        return [point for _, point in study_points(cfg)]
    t = cfg.tune
    keys = sorted(t.param_space)
    sizes = [len(t.param_space[k]) for k in keys]
    n = math.prod(sizes) * t.num_samples
    if n > MAX_TRIALS:
        grid = " x ".join(map(str, sizes)) or "1"
        raise ConfigError(
            f"tune.param_space: a {grid} grid x tune.num_samples={t.num_samples} is {n} trials; "
            f"at most {MAX_TRIALS} allowed"
        )
    combos = [dict(zip(keys, v)) for v in itertools.product(*(t.param_space[k] for k in keys))]
    points = []
    for rep in range(t.num_samples):
        for combo in combos:
            point = dict(combo)
            if rep and "search.seed" not in point:
                point["search.seed"] = cfg.search.seed + rep
            points.append(point)
    return points


def study_points(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """Study mode's trials: ``(variant, point)`` for every variant x seed of ``cfg.study``, in
    that order; the point is the variant's overrides with ``search.seed`` set.

    Raises:
        ConfigError: more than :data:`MAX_TRIALS` trials.
    """
    s = cfg.study
    n = len(s.variants) * len(s.seeds)
    if n > MAX_TRIALS:
        raise ConfigError(
            f"study: {len(s.variants)} variants x {len(s.seeds)} seeds is {n} trials; at most "
            f"{MAX_TRIALS} allowed"
        )
    return [
        (v, {**variant_overrides(v, s.define), "search.seed": seed})
        for v in s.variants
        for seed in s.seeds
    ]


def _check_trials(cfg: Config) -> None:
    """Every trial point must make a valid config (each built without the grid: no recursion)."""
    points = expand_param_space(cfg)
    if not cfg.tune.param_space and not cfg.study.variants:  # only repeats: the shifted seeds
        last = cfg.search.seed + cfg.tune.num_samples - 1
        if last not in SEED:
            raise ConfigError(
                f"tune.num_samples: repeats shift search.seed to {last}; a seed must be {SEED}"
            )
        return
    base = config_to_dict(cfg)
    base["tune"] |= {"param_space": {}, "num_samples": 1}
    base["study"] |= {"variants": []}
    for point in points:
        values = copy.deepcopy(base)
        try:
            for dotted, value in point.items():
                set_dotted(values, dotted, value)
            _build(Config, values)
        except ConfigError as e:
            where = "study" if cfg.study.variants else "tune.param_space"
            raise ConfigError(f"{where}: {e} (trial {point})") from None
