"""What the attack suite runs: :class:`SuiteSettings` and its resolved plan.

The settings are one typed record whose defaults are the ``evaluation`` section's
(:class:`~rarn.config.EvaluationConfig`, built with :meth:`SuiteSettings.from_config`);
:func:`suite_plan` resolves its entries (:mod:`~rarn.robust.evaluation.named`) and checks every
budget before any work. :func:`~rarn.robust.evaluation.suite.evaluate_robustness` runs it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rarn.config import EvaluationConfig
from rarn.robust.attacks import ATTACK_NORM, get_attack
from rarn.robust.evaluation._core import _check_budget
from rarn.robust.evaluation.named import NamedAttack, config_suite, named_attack, named_suite

__all__ = ["Plan", "SuiteSettings", "suite_plan"]

logger = logging.getLogger(__name__)

Plan = dict[str, NamedAttack]
"""Name -> the resolved entry: the suite in order, then the curve's attack if not in it."""


@dataclass(frozen=True)
class SuiteSettings:
    """What :func:`evaluate_robustness` runs: the suite, its budget, the curve and the checks.

    Attributes:
        attacks: the suite, run in this order: registry names (:data:`rarn.robust.attacks.ATTACKS`,
            with the shared ``eps``, ``step_size``, ``steps``), or named entries with their own
            parameters, e.g. ``{"name": "pgd100", "attack": "pgd", "steps": 100}`` and
            ``{"name": "aa", "attack": "autoattack", "n": 200}`` (``n``: only the first n
            images); see :mod:`rarn.robust.evaluation.named`.
        eps: threat-model radius shared by the suite.
        step_size: step size shared by the suite.
        steps: steps shared by the suite.
        per_attack: also report each attack alone (see :func:`evaluate_robustness`).
        main_attack: attack of the accuracy-vs-eps curve and the masking checks: a name of the
            suite or a registry name.
        eps_curve: radii of the curve (step size scaled by ``eps_i / eps``); empty: no curve.
        attack_kwargs: per-name overrides, e.g. ``{"pgd_l2": {"eps": 0.5}, "autoattack":
            {"n_iter": 10}}``.
        checks: run the gradient-masking checks on the first ``check_n`` points.
        check_n: size of the check subset.
        black_box_queries: query budget of the black-box check.
        more_steps_factor: the more-steps check compares PGD-``steps`` with this many times the
            steps (default 5: PGD-20 vs PGD-100).
        batch_size: batch size when the data is a pair of tensors (recorded per row; part of
            the protocol: it changes the attacks' random draws).
        adaptive: when a masking check fires, run the adaptive attacks it calls for (BPDA,
            EOT, a longer Square; :mod:`~rarn.robust.evaluation.adaptive`) on the images still
            robust, and fold them into the worst case (needs ``checks``).
        adaptive_square_queries: queries of the adaptive Square.
        eot_samples: forward passes per step of EOT-PGD.
        fold_batchnorm: attack a copy of the model with its eval-mode batch norms folded into
            the convolutions before them, channels-last on CPU
            (:func:`~rarn.models.inference.folded_copy`: the same function to float rounding,
            faster passes); False: the model as given. Recorded per row (``model_form``).
    """

    # the defaults are EvaluationConfig's (one set of defaults); only what the config derives
    # (per_attack, main_attack, attack_kwargs) is the suite's own
    attacks: tuple[str | Mapping[str, Any] | NamedAttack, ...] = EvaluationConfig.attacks
    eps: float = EvaluationConfig.eps
    step_size: float = EvaluationConfig.step_size
    steps: int = EvaluationConfig.steps
    per_attack: bool = True
    main_attack: str = "pgd"
    eps_curve: tuple[float, ...] = EvaluationConfig.eps_curve
    attack_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    checks: bool = EvaluationConfig.checks
    check_n: int = EvaluationConfig.check_n
    black_box_queries: int = EvaluationConfig.black_box_queries
    more_steps_factor: int = EvaluationConfig.more_steps_factor
    batch_size: int = EvaluationConfig.batch_size
    adaptive: bool = EvaluationConfig.adaptive
    adaptive_square_queries: int = EvaluationConfig.adaptive_square_queries
    eot_samples: int = EvaluationConfig.eot_samples
    fold_batchnorm: bool = EvaluationConfig.fold_batchnorm

    def __post_init__(self) -> None:  # accept any sequence, store tuples (the record is frozen)
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "eps_curve", tuple(self.eps_curve))
        object.__setattr__(self, "attack_kwargs", dict(self.attack_kwargs or {}))

    @classmethod
    def from_config(cls, ev: EvaluationConfig, **overrides: Any) -> SuiteSettings:
        """The suite of an :class:`~rarn.config.EvaluationConfig` (``evaluation`` section).

        Its entries are ``evaluation.attacks`` then ``evaluation.suite``
        (:func:`~rarn.robust.evaluation.named.config_suite`); the curve and the checks use the
        first PGD of the suite (else its first attack); every other field is the section's
        field of the same name. ``overrides`` replace fields.
        """
        entries, keys = config_suite(ev)
        shared = {"eps": ev.eps, "step_size": ev.step_size, "steps": ev.steps}
        named = named_suite(entries, shared, keys=keys, label="evaluation.attacks")
        main = next((a.name for a in named if a.attack == "pgd"), named[0].name)
        same = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(ev)}
        fields = {k: getattr(ev, k) for k in same} | {"attacks": named, "main_attack": main}
        return cls(**{**fields, **overrides})


def suite_plan(s: SuiteSettings) -> tuple[Plan, list[float]]:
    """The resolved suite (and curve attack) and the sorted curve radii; fails before any work."""
    if s.adaptive_square_queries < 1 or s.eot_samples < 1:
        raise ValueError(
            "adaptive_square_queries and eot_samples must be >= 1, got"
            f" {s.adaptive_square_queries}, {s.eot_samples}"
        )
    if s.batch_size < 1 or s.check_n < 0 or s.more_steps_factor < 2:
        raise ValueError(
            "batch_size must be >= 1, check_n >= 0 and more_steps_factor >= 2, got"
            f" {s.batch_size}, {s.check_n}, {s.more_steps_factor}"
        )
    shared = {"eps": s.eps, "step_size": s.step_size, "steps": s.steps}
    plan: Plan = {a.name: a for a in named_suite(s.attacks, shared, overrides=s.attack_kwargs)}
    if s.main_attack not in plan:  # a registry name outside the suite
        plan[s.main_attack] = named_attack(
            s.main_attack, shared, key="main_attack", overrides=s.attack_kwargs
        )
    for name in s.attack_kwargs:
        if name not in plan:
            get_attack(name)  # KeyError listing the known attacks
    curve_eps = sorted({float(e) for e in s.eps_curve})
    for e in curve_eps:
        _check_budget(e, s.step_size, s.steps)
    norms = {ATTACK_NORM[a.attack] for a in plan.values()}
    if len(norms) > 1:
        logger.warning("suite %s mixes L-inf and L2: the worst case is over their union", s.attacks)
    return plan, curve_eps
