"""rarn: RACL (Adversarially Robust Neural Architectures, Dong et al., TPAMI 2025) in PyTorch.

The names below are the stable public API: scripts should import them from ``rarn`` and will not
break when modules move. The rooms behind them (see ``docs/architecture.md``):

* ``rarn.space``, ``rarn.config``: the search space (op registry, genotypes) and typed configs,
  the ground floor: neither imports another room.
* ``rarn.checkpoint``, ``rarn.data``: safe checkpoints, datasets.
* ``rarn.nas``: decoding, supernet, chance constraint, search loop.
* ``rarn.lipschitz``: per-op Lipschitz rules, search-time estimator, certified network bound.
* ``rarn.models``: the DARTS evaluation network and the baselines.
* ``rarn.robust``: attacks, adversarial (re)training, robustness evaluation.

This package never imports ``ray`` or ``mlflow``. The heavy names are resolved lazily, so
``import rarn.config`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rarn.config import rules as _config_rules

__version__ = "0.1.0"

# The modules whose registries check config names (data.name, retrain.genotype/baselines, the
# evaluation suite, the constraint's choices). rarn.config imports no other room, so the root
# names them; they are imported when a config is first checked.
_config_rules.rule_modules(
    "rarn.data.sources",
    "rarn.models.baselines",
    "rarn.robust.evaluation.named",
    "rarn.nas.choices",
)

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Config": "rarn.config",
    "ConfigError": "rarn.config",
    "load_config": "rarn.config",
    "with_overrides": "rarn.config",
    "DataConfig": "rarn.config",
    "SearchConfig": "rarn.config",
    "ConstraintConfig": "rarn.config",
    "RetrainConfig": "rarn.config",
    "EvaluationConfig": "rarn.config",
    "VARIANTS": "rarn.config.variants",
    "variant_overrides": "rarn.config.variants",
    "load_dataset": "rarn.data",
    "as_tensors": "rarn.data",
    "make_loader": "rarn.data",
    "Genotype": "rarn.space.genotype",
    "GENOTYPES": "rarn.space.genotype",
    "get_genotype": "rarn.space.genotype",
    "random_genotype": "rarn.space.genotype",
    "OPS": "rarn.space.ops",
    "PRIMITIVES": "rarn.space.ops",
    "ArchSample": "rarn.nas.supernet",
    "Supernet": "rarn.nas.supernet",
    "log_bound": "rarn.nas.constraint",
    "RACLSearch": "rarn.nas.search",
    "SearchData": "rarn.nas.loop",
    "SearchResult": "rarn.nas.loop",
    "run_search": "rarn.nas.loop",
    "build_network": "rarn.models.darts",
    "count_parameters": "rarn.models.darts",
    "eval_mode": "rarn.models.common",
    "lipschitz_upper_bound": "rarn.lipschitz.certify",
    "ATTACKS": "rarn.robust.attacks",
    "get_attack": "rarn.robust.attacks",
    "make_step": "rarn.robust.steps",
    "train_epoch": "rarn.robust.loop",
    "run_retrain": "rarn.robust.retrain",
    "SuiteSettings": "rarn.robust.evaluation",
    "NamedAttack": "rarn.robust.evaluation",
    "named_suite": "rarn.robust.evaluation",
    "evaluate_robustness": "rarn.robust.evaluation",
    "compare": "rarn.stats",
    "read_runs_csv": "rarn.study",
}

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "load_config",
    "with_overrides",
    "DataConfig",
    "SearchConfig",
    "ConstraintConfig",
    "RetrainConfig",
    "EvaluationConfig",
    "VARIANTS",
    "variant_overrides",
    "load_dataset",
    "as_tensors",
    "make_loader",
    "Genotype",
    "GENOTYPES",
    "get_genotype",
    "random_genotype",
    "OPS",
    "PRIMITIVES",
    "ArchSample",
    "Supernet",
    "log_bound",
    "RACLSearch",
    "SearchData",
    "SearchResult",
    "run_search",
    "build_network",
    "count_parameters",
    "eval_mode",
    "lipschitz_upper_bound",
    "ATTACKS",
    "get_attack",
    "make_step",
    "train_epoch",
    "run_retrain",
    "SuiteSettings",
    "NamedAttack",
    "named_suite",
    "evaluate_robustness",
    "compare",
    "read_runs_csv",
]


def __getattr__(name: str) -> Any:  # PEP 562: import the defining module on first use
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rarn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from rarn.config import (
        Config,
        ConfigError,
        ConstraintConfig,
        DataConfig,
        EvaluationConfig,
        RetrainConfig,
        SearchConfig,
        load_config,
        with_overrides,
    )
    from rarn.config.variants import VARIANTS, variant_overrides
    from rarn.data import as_tensors, load_dataset, make_loader
    from rarn.lipschitz.certify import lipschitz_upper_bound
    from rarn.models.common import eval_mode
    from rarn.models.darts import build_network, count_parameters
    from rarn.nas.constraint import log_bound
    from rarn.nas.loop import SearchData, SearchResult, run_search
    from rarn.nas.search import RACLSearch
    from rarn.nas.supernet import ArchSample, Supernet
    from rarn.robust.attacks import ATTACKS, get_attack
    from rarn.robust.evaluation import NamedAttack, SuiteSettings, evaluate_robustness, named_suite
    from rarn.robust.loop import train_epoch
    from rarn.robust.retrain import run_retrain
    from rarn.robust.steps import make_step
    from rarn.space.genotype import GENOTYPES, Genotype, get_genotype, random_genotype
    from rarn.space.ops import OPS, PRIMITIVES
    from rarn.stats import compare
    from rarn.study import read_runs_csv
