"""Running the attack suite: clean, per-attack and worst-case robust accuracy of one model.

Implements the evaluation protocol of spec section 6.1: clean accuracy, robust accuracy under each
attack of :mod:`rarn.robust.attacks` (Eq. (1) of the spec), and the per-sample worst case over
the suite in the manner of AutoAttack (Croce and Hein 2020, https://arxiv.org/abs/2003.01690):
a boolean ``robust`` mask, robust accuracy ``robust.float().mean()``. What to run is one typed
:class:`SuiteSettings`; the two ways of running it (each attack alone, or each only on the
survivors of the earlier ones) are one function each. Every result carries the flags of the
gradient-masking checks (:mod:`rarn.robust.evaluation.masking`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rarn.models.common import device_of
from rarn.robust.attacks import ATTACK_NORM, get_attack, validate_attack_args
from rarn.robust.evaluation._core import (
    Data,
    _batches,
    _check_budget,
    _fraction,
    _predict,
    _survives,
)
from rarn.robust.evaluation.evidence import masking_flags
from rarn.robust.evaluation.masking import check_larger_eps, unbounded_radius
from rarn.robust.evaluation.named import NamedAttack, config_suite, named_attack, named_suite
from rarn.robust.evaluation.records import DataHasher
from rarn.robust.evaluation.results import RobustnessResult

__all__ = ["SuiteSettings", "evaluate_robustness"]

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
        batch_size: batch size when the data is a pair of tensors.
    """

    attacks: tuple[str | Mapping[str, Any] | NamedAttack, ...] = ("fgsm", "pgd", "mim", "cw")
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    per_attack: bool = True
    main_attack: str = "pgd"
    eps_curve: tuple[float, ...] = ()
    attack_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    checks: bool = True
    check_n: int = 256
    black_box_queries: int = 500
    more_steps_factor: int = 5
    batch_size: int = 256

    def __post_init__(self) -> None:  # accept any sequence, store tuples (the record is frozen)
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "eps_curve", tuple(self.eps_curve))
        object.__setattr__(self, "attack_kwargs", dict(self.attack_kwargs or {}))

    @classmethod
    def from_config(cls, ev: Any, **overrides: Any) -> SuiteSettings:
        """The suite of an :class:`~rarn.config.EvaluationConfig` (``evaluation`` section).

        Its entries are ``evaluation.attacks`` then ``evaluation.suite``
        (:func:`~rarn.robust.evaluation.named.config_suite`); the curve and the checks use the
        first PGD of the suite (else its first attack). ``overrides`` replace fields.
        """
        entries, keys = config_suite(ev)
        shared = {"eps": ev.eps, "step_size": ev.step_size, "steps": ev.steps}
        named = named_suite(entries, shared, keys=keys, label="evaluation.attacks")
        main = next((a.name for a in named if a.attack == "pgd"), named[0].name)
        fields = {
            "attacks": named,
            "main_attack": main,
            **shared,
            "eps_curve": ev.eps_curve,
            "batch_size": ev.batch_size,
            "checks": ev.checks,
            "check_n": ev.check_n,
            "black_box_queries": ev.black_box_queries,
            "more_steps_factor": ev.more_steps_factor,
        }
        return cls(**{**fields, **overrides})


Records = dict[str, tuple[Tensor, Tensor]]
"""Name -> per-image ``(attacked, survived)`` masks of one batch."""


@dataclass
class _Tally:
    """What the batches add up to: per-image masks (on CPU), curve hits and the check subset."""

    attacks: tuple[str, ...]
    curve_hits: dict[float, int]
    n: int = 0
    correct: list[Tensor] = field(default_factory=list)
    attacked: dict[str, list[Tensor]] = field(default_factory=dict)
    survived: dict[str, list[Tensor]] = field(default_factory=dict)
    x_check: list[Tensor] = field(default_factory=list)
    y_check: list[Tensor] = field(default_factory=list)
    data: DataHasher = field(default_factory=DataHasher)
    image_numel: int = 0

    def add(self, correct: Tensor, records: Records) -> None:
        self.correct.append(correct.cpu())
        for name, (attacked, survived) in records.items():
            self.attacked.setdefault(name, []).append(attacked.cpu())
            self.survived.setdefault(name, []).append(survived.cpu())

    def masks(self) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``correct``, ``attacked`` and ``survived`` over all batches."""
        cat = {k: torch.cat(v) for k, v in self.attacked.items()}
        return torch.cat(self.correct), cat, {k: torch.cat(v) for k, v in self.survived.items()}


def evaluate_robustness(
    model: nn.Module,
    data: Data,
    settings: SuiteSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    model_name: str = "model",
    device: torch.device | str | None = None,
    **overrides: Any,
) -> RobustnessResult:
    """Clean, per-attack and worst-case robust accuracy, the eps curve and the masking flags.

    Only clean-correct points are attacked (a misclassified point is never robust). With
    ``per_attack`` every attack runs alone on all clean-correct points and the worst case is the
    per-sample AND of those runs; without it, AutoAttack-style, each attack runs only on the
    points that survived the earlier ones (cheaper, but no per-attack numbers). Either way
    ``worst_case_accuracy <= min(robust_accuracy.values())``.

    Args:
        model: classifier returning logits; its train/eval mode is restored afterwards.
        data: a loader of ``(x, y, ...)`` batches or one ``(x, y)`` pair; x in [0, 1], NCHW.
        settings: what to run (default: ``SuiteSettings()``).
        generator: randomness of all attacks (None: seeded with 0); its seed is recorded.
        model_name: label for the results table.
        device: where to evaluate (None: the model's device).
        **overrides: fields of :class:`SuiteSettings` replacing those of ``settings``, e.g.
            ``evaluate_robustness(model, data, attacks=("pgd",), eps=0.1)``.

    Returns:
        A :class:`~rarn.robust.evaluation.results.RobustnessResult`.

    Raises:
        KeyError: an unknown attack name (listing the known ones).
        ValueError: invalid eps/step_size/steps, inputs outside [0, 1], or no data.
        TypeError: an override that is not a field of :class:`SuiteSettings`.
    """
    s = dataclasses.replace(settings or SuiteSettings(), **overrides)
    plan, curve_eps = _plan(s)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = torch.device(device) if device is not None else device_of(model)
    tally = _run_batches(model, data, s, plan, curve_eps, generator, device)
    correct, attacked, survived = tally.masks()
    suite = [plan[a] for a in tally.attacks]
    subsets = {a.name: a.subset(tally.n) for a in plan.values()}
    m = min(subsets[a.name] for a in suite)  # the images every attack saw: the worst case's
    robust = correct[:m].clone()
    for ok in survived.values():
        robust &= ok[:m]
    flags = masking_flags(model, s, plan, tally, survived, generator)
    curve = {e: tally.curve_hits[e] / tally.n for e in curve_eps}
    large = unbounded_radius(ATTACK_NORM[plan[s.main_attack].attack], tally.image_numel)
    if len(curve) >= 2 and check_larger_eps(curve, large_eps=large):
        flags["eps_not_decreasing"] = True
    return RobustnessResult(
        model_name=model_name,
        n=tally.n,
        clean_accuracy=_fraction(correct),
        robust_accuracy={a: _fraction(k[: subsets[a]]) for a, k in survived.items()}
        if s.per_attack
        else {},
        worst_case_accuracy=_fraction(robust),
        robust=robust,
        attacks=tally.attacks,
        params={a.name: dict(a.params) for a in plan.values()},
        main_attack=s.main_attack,
        curve=curve,
        flags=flags,
        seed=generator.initial_seed(),
        correct=correct,
        attacked=attacked,
        survived=survived,
        per_attack=s.per_attack,
        data_sha256=tally.data.hexdigest(),
        methods={a.name: a.attack for a in plan.values()},
        subsets=subsets,
    )


def _plan(s: SuiteSettings) -> tuple[Plan, list[float]]:
    """The resolved suite (and curve attack) and the sorted curve radii; fails before any work."""
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


def _attack_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    correct: Tensor,
    g: torch.Generator,
    suite: dict[str, tuple[NamedAttack, Tensor]],
    *,
    in_turn: bool,
) -> Records:
    """Every attack on the clean-correct points of its subset (``suite``: name -> entry, subset
    mask): alone (per-attack mode) or, ``in_turn`` (AutoAttack's way), only on the points no
    earlier attack fooled."""
    records, robust = {}, correct
    for name, (a, seen) in suite.items():
        mask = (robust if in_turn else correct) & seen
        survived = _survives(model, a.attack, x, y, mask, g, a.params)
        records[name] = (mask, survived)
        if in_turn:
            robust = torch.where(seen, survived, robust)
    return records


def _run_batches(
    model: nn.Module,
    data: Data,
    s: SuiteSettings,
    plan: Plan,
    curve_eps: list[float],
    generator: torch.Generator,
    device: torch.device,
) -> _Tally:
    """Attack every batch (in the mode of ``s.per_attack``) and add up the masks and the curve."""
    names = tuple(plan)[: len(s.attacks)]  # the suite; then, maybe, the curve's own attack
    main = plan[s.main_attack]
    tally = _Tally(attacks=names, curve_hits=dict.fromkeys(curve_eps, 0))
    for xb, yb in _batches(data, s.batch_size):
        xb, yb = xb.to(device), yb.to(device)
        validate_attack_args(xb, yb, eps=s.eps, step_size=s.step_size, steps=s.steps)
        tally.data.update(xb, yb)
        tally.image_numel = xb[0].numel() if len(xb) else tally.image_numel
        if tally.n < s.check_n:
            tally.x_check.append(xb[: s.check_n - tally.n])
            tally.y_check.append(yb[: s.check_n - tally.n])
        index = torch.arange(tally.n, tally.n + xb.shape[0], device=device)
        tally.n += xb.shape[0]
        correct = _predict(model, xb) == yb
        suite = {a: (plan[a], index < plan[a].n if plan[a].n else index >= 0) for a in names}
        records = _attack_batch(model, xb, yb, correct, generator, suite, in_turn=not s.per_attack)
        for e in curve_eps:
            reuse = s.per_attack and s.main_attack in records and main.n == 0
            if reuse and math.isclose(e, main.params["eps"]):
                hits = records[s.main_attack][1]  # the curve point is the attack alone: reuse it
            else:
                step = main.params["step_size"] * e / main.params["eps"]
                p = {**main.params, "eps": e, "step_size": step}
                hits = _survives(model, main.attack, xb, yb, correct, generator, p)
            tally.curve_hits[e] += int(hits.sum())
        tally.add(correct, records)
    if tally.n == 0:
        raise ValueError("no data: the loader yielded no points")
    return tally
