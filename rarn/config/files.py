"""YAML files and ``dotted.key=value`` overrides: the one parser for the library and the pipeline.

The YAML reader is ``yaml.SafeLoader`` made strict for hand-written configs: no aliases (an
anchor bomb expands to gigabytes when the config is copied or logged), no repeated keys (the
second silently won) and no merge keys (``<<``, which would override a key unseen), nesting at
most 32 deep, files up to 1 MiB; and ``1e-3`` reads as a float (YAML 1.1 wants ``1.0e-3``, which
nobody writes). An empty file is an error, not the defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rarn.config.build import config_from_dict, config_to_dict, set_dotted
from rarn.config.schema import Config, ConfigError

__all__ = [
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
    "parse_value",
]

MAX_FILE_BYTES = 1 << 20
MAX_OVERRIDE_CHARS = 1 << 16
MAX_DEPTH = 32


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases, repeated keys or deep nesting; ``1e-3`` is a float."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            raise ConfigError(
                f"line {mark.line + 1}: YAML aliases (*{anchor}) are not allowed; write the value"
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` would bypass the repeat check
                raise ConfigError(f"line {key_node.start_mark.line + 1}: YAML merge keys (<<) are "
                                  "not allowed; write the keys")  # fmt: skip
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes the strings :class:`_StrictLoader` would read as floats (``"1e5"``)."""


for _cls in (_StrictLoader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def _load_yaml(text: str) -> Any:
    """Parse YAML text strictly; ConfigError for what the strict loader refuses."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError) as e:  # a constructor, e.g. a 5000-digit int
        raise yaml.YAMLError(f"cannot read a value: {e}") from None
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """An override value: YAML flow syntax (``2``, ``0.1``, ``1e-3``, ``false``, ``[fgsm, pgd]``,
    ``{search.seed: [0, 1]}``); text that is not YAML stays a string, empty text is ``""``.

    Raises:
        ConfigError: an alias, a repeated key or deep nesting (see the module docstring).
    """
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"value of {len(text)} characters; at most {MAX_OVERRIDE_CHARS}")
    if not text.strip():
        return ""
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``"search.epochs=2"`` -> ``("search.epochs", 2)``; the value as by :func:`parse_value`."""
    if "=" not in text:
        raise ConfigError(f"override {text[:80]!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text[:80]!r}: empty key")
    try:
        return key, parse_value(raw)
    except ConfigError as e:
        raise ConfigError(f"override {key}: {e}") from None


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys (``search.epochs=2``) in a copy of a nested dict; values as YAML scalars.

    Keys are checked against the config tree here, so a typo fails even when it would only
    create a new nested mapping; values are checked when the config is built.
    """
    out = dict(values)
    for text in overrides:
        set_dotted(out, *parse_override(text))
    return out


def _read_yaml_file(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes; a config file holds at most 1 MiB")
    try:
        loaded = _load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if loaded is None:
        raise ConfigError(
            f"{p}: the file is empty; an empty config would silently run every default "
            "(write the sections to change, e.g. 'search: {epochs: 2}')"
        )
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {loaded!r:.80}")
    return dict(loaded)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated into a :class:`Config`.

    Raises:
        ConfigError: naming the file or dotted key, the bad value and what is allowed.
    """
    values = {} if path is None else _read_yaml_file(Path(path))
    return config_from_dict(apply_overrides(values, overrides))


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML text (also written to ``path`` when given)."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
