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
from rarn.robust.attacks import ATTACK_NORM, attack_spec, get_attack, validate_attack_args
from rarn.robust.evaluation._core import Data, _batches, _check_budget, _predict, _survives
from rarn.robust.evaluation.masking import (
    MASKING_FLAGS,
    check_fgsm_vs_pgd,
    check_larger_eps,
    run_masking_checks,
    unbounded_radius,
)
from rarn.robust.evaluation.records import DataHasher
from rarn.robust.evaluation.results import RobustnessResult

__all__ = ["SuiteSettings", "evaluate_robustness"]

logger = logging.getLogger(__name__)

Params = dict[str, dict[str, Any]]
"""Attack name -> its keyword arguments (``eps``, ``step_size``, ``steps`` and extras)."""


@dataclass(frozen=True)
class SuiteSettings:
    """What :func:`evaluate_robustness` runs: the suite, its budget, the curve and the checks.

    Attributes:
        attacks: names from :data:`rarn.robust.attacks.ATTACKS`, run in this order.
        eps: threat-model radius shared by the suite.
        step_size: step size shared by the suite.
        steps: steps shared by the suite.
        per_attack: also report each attack alone (see :func:`evaluate_robustness`).
        main_attack: attack of the accuracy-vs-eps curve.
        eps_curve: radii of the curve (step size scaled by ``eps_i / eps``); empty: no curve.
        attack_kwargs: per-attack overrides, e.g. ``{"pgd_l2": {"eps": 0.5}, "autoattack":
            {"n_iter": 10}}``.
        checks: run the gradient-masking checks on the first ``check_n`` points.
        check_n: size of the check subset.
        black_box_queries: query budget of the black-box check.
        more_steps_factor: the more-steps check compares PGD-``steps`` with this many times the
            steps (default 5: PGD-20 vs PGD-100).
        batch_size: batch size when the data is a pair of tensors.
    """

    attacks: tuple[str, ...] = ("fgsm", "pgd", "mim", "cw")
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


Records = dict[str, tuple[Tensor, Tensor]]
"""Attack -> per-image ``(attacked, survived)`` masks of one batch."""


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
    params, curve_eps = _attack_params(s)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = torch.device(device) if device is not None else device_of(model)
    tally = _run_batches(model, data, s, params, curve_eps, generator, device)
    correct, attacked, survived = tally.masks()
    robust = correct.clone()
    for ok in survived.values():
        robust &= ok
    flags = _masking_flags(model, s, params, tally, survived, generator)
    curve = {e: tally.curve_hits[e] / tally.n for e in curve_eps}
    large = unbounded_radius(ATTACK_NORM[s.main_attack], tally.image_numel)
    if len(curve) >= 2 and check_larger_eps(curve, large_eps=large):
        flags["eps_not_decreasing"] = True
    return RobustnessResult(
        model_name=model_name,
        n=tally.n,
        clean_accuracy=_fraction(correct),
        robust_accuracy={a: _fraction(m) for a, m in survived.items()} if s.per_attack else {},
        worst_case_accuracy=_fraction(robust),
        robust=robust,
        attacks=s.attacks,
        params=params,
        main_attack=s.main_attack,
        curve=curve,
        flags=flags,
        seed=generator.initial_seed(),
        correct=correct,
        attacked=attacked,
        survived=survived,
        per_attack=s.per_attack,
        data_sha256=tally.data.hexdigest(),
    )


def _fraction(mask: Tensor) -> float:
    """Accuracy as ``count / n`` in float64, so per-image records recombine to it exactly."""
    return int(mask.sum()) / mask.numel()


def _attack_params(s: SuiteSettings) -> tuple[Params, list[float]]:
    """Each attack's keyword arguments and the sorted curve radii; fails before any work."""
    if not s.attacks:
        raise ValueError("attacks must name at least one attack")
    if len(set(s.attacks)) != len(s.attacks):
        raise ValueError(f"attacks contains duplicates: {s.attacks}")
    for name in (*s.attacks, s.main_attack, *s.attack_kwargs):
        get_attack(name)
    if s.batch_size < 1 or s.check_n < 0 or s.more_steps_factor < 2:
        raise ValueError(
            "batch_size must be >= 1, check_n >= 0 and more_steps_factor >= 2, got"
            f" {s.batch_size}, {s.check_n}, {s.more_steps_factor}"
        )
    params: Params = {}
    for name in dict.fromkeys((*s.attacks, s.main_attack)):
        params[name] = {"eps": s.eps, "step_size": s.step_size, "steps": s.steps}
        params[name].update(s.attack_kwargs.get(name, {}))
    for p in params.values():  # with the attack's own message
        _check_budget(p["eps"], p["step_size"], p["steps"])
    curve_eps = sorted({float(e) for e in s.eps_curve})
    for e in curve_eps:
        _check_budget(e, s.step_size, s.steps)
    if len({ATTACK_NORM[a] for a in s.attacks}) > 1:
        logger.warning("suite %s mixes L-inf and L2: the worst case is over their union", s.attacks)
    return params, curve_eps


def _attack_each(
    model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, g: torch.Generator, params: Params
) -> Records:
    """Per-attack mode: every attack alone on all clean-correct points."""
    return {
        name: (correct, _survives(model, name, x, y, correct, g, p)) for name, p in params.items()
    }


def _attack_in_turn(
    model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, g: torch.Generator, params: Params
) -> Records:
    """AutoAttack mode: each attack only on the points no earlier attack fooled."""
    records, robust = {}, correct
    for name, p in params.items():
        survived = _survives(model, name, x, y, robust, g, p)
        records[name], robust = (robust, survived), survived
    return records


def _run_batches(
    model: nn.Module,
    data: Data,
    s: SuiteSettings,
    params: Params,
    curve_eps: list[float],
    generator: torch.Generator,
    device: torch.device,
) -> _Tally:
    """Attack every batch (in the mode of ``s.per_attack``) and add up the masks and the curve."""
    suite = {name: params[name] for name in s.attacks}
    attack_batch = _attack_each if s.per_attack else _attack_in_turn
    main = params[s.main_attack]
    tally = _Tally(attacks=s.attacks, curve_hits=dict.fromkeys(curve_eps, 0))
    for xb, yb in _batches(data, s.batch_size):
        xb, yb = xb.to(device), yb.to(device)
        validate_attack_args(xb, yb, eps=s.eps, step_size=s.step_size, steps=s.steps)
        tally.data.update(xb, yb)
        tally.image_numel = xb[0].numel() if len(xb) else tally.image_numel
        if tally.n < s.check_n:
            tally.x_check.append(xb[: s.check_n - tally.n])
            tally.y_check.append(yb[: s.check_n - tally.n])
        tally.n += xb.shape[0]
        correct = _predict(model, xb) == yb
        records = attack_batch(model, xb, yb, correct, generator, suite)
        for e in curve_eps:
            if s.per_attack and s.main_attack in records and math.isclose(e, main["eps"]):
                hits = records[s.main_attack][1]  # the curve point is the attack alone: reuse it
            else:
                p = {**main, "eps": e, "step_size": main["step_size"] * e / main["eps"]}
                hits = _survives(model, s.main_attack, xb, yb, correct, generator, p)
            tally.curve_hits[e] += int(hits.sum())
        tally.add(correct, records)
    if tally.n == 0:
        raise ValueError("no data: the loader yielded no points")
    return tally


def _masking_flags(
    model: nn.Module,
    s: SuiteSettings,
    params: Params,
    tally: _Tally,
    survived: dict[str, Tensor],
    generator: torch.Generator,
) -> dict[str, bool | None]:
    """The masking checks on the first ``check_n`` points, against the suite's white-box evidence.

    White-box evidence: images that every purely white-box attack of the suite (not AutoAttack,
    whose Square is a black box) ran on and failed on; none such: the checks' own PGD alone.
    """
    flags: dict[str, bool | None] = dict.fromkeys(MASKING_FLAGS)
    if not (s.checks and s.check_n > 0):
        return flags
    xc, yc = torch.cat(tally.x_check), torch.cat(tally.y_check)
    white = [a for a in s.attacks if attack_spec(a).white_box and not attack_spec(a).black_box_part]
    wb = None
    if white:
        wb = torch.stack([survived[a][: len(yc)] for a in white]).all(dim=0)
    main = params[s.main_attack]
    flags = run_masking_checks(
        model,
        xc,
        yc,
        eps=main["eps"],
        step_size=main["step_size"],
        steps=main["steps"],
        generator=generator,
        white_box_robust=wb,
        norm=ATTACK_NORM[s.main_attack],
        black_box_queries=s.black_box_queries,
        more_steps_factor=s.more_steps_factor,
    )
    both = s.per_attack and {"fgsm", "pgd"} <= set(survived)
    if both and params["fgsm"]["eps"] == params["pgd"]["eps"]:  # the whole data: more evidence
        fgsm, pgd = _fraction(survived["fgsm"]), _fraction(survived["pgd"])
        flags["fgsm_beats_pgd"] = bool(flags["fgsm_beats_pgd"]) or check_fgsm_vs_pgd(
            fgsm, pgd, n=tally.n
        )
    return flags
