"""rarn: RACL (Adversarially Robust Neural Architectures, Dong et al., TPAMI 2025) in PyTorch.

The names below are the stable public API: scripts should import them from ``rarn`` and will not
break when modules move. The rooms behind them (see ``docs/architecture.md``):

* ``rarn.config``, ``rarn.checkpoint``, ``rarn.data``: typed configs, safe checkpoints, datasets.
* ``rarn.nas``: op registry, genotypes and decoding, supernet, chance constraint, search loop.
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
# evaluation suite). rarn.config imports no other room, so the root names them; they are imported
# when a config is first checked.
_config_rules.rule_modules(
    "rarn.data.sources", "rarn.models.baselines", "rarn.robust.evaluation.named"
)

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Config": "rarn.config",
    "ConfigError": "rarn.config",
    "load_config": "rarn.config",
    "load_dataset": "rarn.data",
    "Genotype": "rarn.space.genotype",
    "GENOTYPES": "rarn.space.genotype",
    "get_genotype": "rarn.space.genotype",
    "OPS": "rarn.space.ops",
    "PRIMITIVES": "rarn.space.ops",
    "SearchData": "rarn.nas.loop",
    "SearchResult": "rarn.nas.loop",
    "run_search": "rarn.nas.loop",
    "build_network": "rarn.models.darts",
    "lipschitz_upper_bound": "rarn.lipschitz.certify",
    "ATTACKS": "rarn.robust.attacks",
    "get_attack": "rarn.robust.attacks",
    "run_retrain": "rarn.robust.retrain",
    "evaluate_robustness": "rarn.robust.evaluation",
}

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "load_config",
    "load_dataset",
    "Genotype",
    "GENOTYPES",
    "get_genotype",
    "OPS",
    "PRIMITIVES",
    "SearchData",
    "SearchResult",
    "run_search",
    "build_network",
    "lipschitz_upper_bound",
    "ATTACKS",
    "get_attack",
    "run_retrain",
    "evaluate_robustness",
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
    from rarn.config import Config, ConfigError, load_config
    from rarn.data import load_dataset
    from rarn.lipschitz.certify import lipschitz_upper_bound
    from rarn.models.darts import build_network
    from rarn.nas.loop import SearchData, SearchResult, run_search
    from rarn.robust.attacks import ATTACKS, get_attack
    from rarn.robust.evaluation import evaluate_robustness
    from rarn.robust.retrain import run_retrain
    from rarn.space.genotype import GENOTYPES, Genotype, get_genotype
    from rarn.space.ops import OPS, PRIMITIVES
