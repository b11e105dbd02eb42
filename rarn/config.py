"""Typed, frozen configuration: one dataclass per stage, loaded from YAML with dotted overrides.

``load_config("configs/default.yaml", ["search.epochs=2", "constraint.kappa=0.1"])`` returns a
:class:`Config`. YAML is merged onto the dataclass defaults; every key must exist and every value
must have the declared type (an ``int`` is accepted where a ``float`` is declared). Anything else
raises :class:`ConfigError`, whose message names the dotted key and the expected type; command-line
front ends turn it into exit code 2. ``dump_config`` writes the resolved config back to YAML.

Functions take the section they need (``SearchConfig``, ``ConstraintConfig``, ...), never the root.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "ConstraintConfig",
    "DataConfig",
    "EvaluationConfig",
    "RetrainConfig",
    "SearchConfig",
    "TrackingConfig",
    "TuneConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how it is split."""

    name: str = "digits"  # digits | cifar10 | cifar10-npz | imagefolder (rarn.data.DATASETS)
    root: str = "data"  # download/cache dir (cifar10) or ImageFolder root (train/, val/ inside)
    path: str = ""  # the .npz file for cifar10-npz
    limit: int = 0  # keep only the first N training images (0: all); class-balanced prefixes
    test_limit: int = 0  # keep only the first N test images (0: all)
    test_fraction: float = 0.2  # held-out test share for datasets without a test split
    train_portion: float = 0.5  # D_T share of the training data in search (rest is D_V)
    image_size: int = 0  # resize to this side length (0: native)
    seed: int = 0  # split seed
    download: bool = False  # allow torchvision to download cifar10


@dataclass(frozen=True)
class SearchConfig:
    """The PC-DARTS-style supernet and the bilevel RACL search (spec §2.2, §2.6, §3)."""

    epochs: int = 50
    warmup_epochs: int = 15  # architecture frozen for these epochs (PC-DARTS)
    batch_size: int = 128
    max_steps_per_epoch: int = 0  # 0: a full pass over D_T
    init_channels: int = 16
    layers: int = 8
    nodes: int = 4  # intermediate nodes per cell
    partial_channels: int = 4  # PC-DARTS K: 1/K of the channels enter the mixed op
    lr: float = 0.1
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 6e-4
    arch_weight_decay: float = 1e-3
    arch_beta1: float = 0.5
    arch_beta2: float = 0.999
    sampling: bool = True  # log-normal architecture parameters; False: deterministic (PC-DARTS)
    sigma_init: float = 0.3
    sigma_min: float = 1e-3
    sigma_max: float = 2.0
    grad_norm_weight: float = 0.1  # gamma of the input-gradient-norm penalty (0: off)
    grad_norm_mode: str = "finite_difference"  # exact | finite_difference
    fd_step: float = 0.01  # finite-difference step along the input-gradient direction
    decode: str = "quantile"  # quantile | median | sample
    decode_samples: int = 100  # samples for the majority-vote decoding
    fused: bool = True  # fused supernet forward (same maths as the per-edge reference)
    seed: int = 0


@dataclass(frozen=True)
class ConstraintConfig:
    """The chance constraint P(lambda_F <= lambda_bar) >= eta on the log-normal bound (§2.4-2.6)."""

    enabled: bool = True
    eta: float = 0.9
    estimator: str = "delta"  # delta | fenton_wilkinson | monte_carlo
    mc_samples: int = 16
    bound: str = "node_mean"  # product | node_mean (see docs/constraint.md)
    mixture: str = "parametric"  # ops in the bound's mixture: all | no_none | parametric
    include_bn: bool = True  # BN scale from running statistics in every lambda_o
    threshold: str = (
        "tracking"  # absolute | relative | tracking (rarn.nas.constraint.ChanceConstraint)
    )
    kappa: float = 0.05  # relative: ln lambda_bar = mu_F0 - kappa * |mu_F0|
    log_lambda_bar: float = 0.0  # absolute threshold on the (possibly per-node) log-bound
    rho: float = 1.0  # augmented-Lagrangian penalty
    dual_init: float = 0.0
    power_iterations: int = 1  # power-iteration steps per architecture step


@dataclass(frozen=True)
class RetrainConfig:
    """Adversarial retraining of a discrete genotype (spec §4)."""

    genotype: str = "RACL"  # a bundled genotype name or a path to a genotype JSON file
    epochs: int = 100
    batch_size: int = 128
    init_channels: int = 36
    layers: int = 20
    auxiliary_weight: float = 0.0  # 0: no auxiliary head
    drop_path: float = 0.0
    lr: float = 0.1
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 2e-4
    grad_clip: float = 5.0
    schedule: str = "cosine"  # cosine | step
    method: str = "pgd"  # standard | pgd | trades | fast
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 7
    trades_beta: float = 6.0
    val_fraction: float = 0.1  # held-out split for best-robust checkpoint selection
    val_steps: int = 3  # PGD steps of the selection attack
    bf16: bool = False  # autocast on GPU
    channels_last: bool = False
    seed: int = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """The attack suite (spec §6.1)."""

    attacks: tuple[str, ...] = ("fgsm", "pgd", "mim", "cw")
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    eps_curve: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255)
    batch_size: int = 256
    autoattack: bool = False
    checks: bool = True  # gradient-masking checks (rarn.robust.evaluation.run_masking_checks)
    black_box_queries: int = 500  # query budget of the black-box (Square) check
    seed: int = 0


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune: how many searches, over what, with which resources."""

    num_samples: int = 1
    param_space: dict[str, list] = field(default_factory=dict)  # dotted key -> grid values
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    scheduler: str = "none"  # none | asha
    grace_period: int = 1
    max_failures: int = 2
    top_k: int = 1
    select_metric: str = "val_acc"
    select_mode: str = "max"
    retrain_workers: int = 1
    retrain_use_gpu: bool = False
    retrain_cpus_per_worker: float = 1.0  # CPUs of each Ray Train worker
    storage_path: str = ""  # "" -> <run_dir>/ray


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow lineage and registry."""

    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "rarn"
    registered_model: str = "rarn-digits"
    alias: str = "champion"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_dir: str = "runs/default"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        item = args[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; "
            f"{cls.__name__} has: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def config_from_dict(values: Mapping[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested mappings (e.g. parsed YAML), strictly."""
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


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys (``search.epochs=2``) in a nested dict; values are parsed as YAML scalars.

    Keys are checked against the dataclass tree here, so a typo fails even when it would only
    create a new nested mapping.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    for text in overrides:
        path, value = _parse_override(text)
        cls: Any = Config
        node = out
        for depth, part in enumerate(path):
            field_names = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            dotted = ".".join(path[: depth + 1])
            if cls is None or part not in field_names:
                raise ConfigError(f"unknown config key {dotted}")
            tp = typing.get_type_hints(cls)[part]
            if depth == len(path) - 1:
                if isinstance(value, str) and tp in (int, float, bool):
                    raise ConfigError(f"{dotted}: expected {_type_name(tp)}, got {value!r}")
                node[part] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"unknown config key {dotted}.{path[depth + 1]}")
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, Mapping) else {}
                node = node[part]
                cls = tp
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated into a :class:`Config`."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        values = dict(loaded or {})
    return config_from_dict(apply_overrides(values, overrides))


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML text (also written to ``path`` when given)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
