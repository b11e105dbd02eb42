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
from rarn.robust.evaluation.masking import MASKING_FLAGS, check_larger_eps, run_masking_checks
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
    batch_size: int = 256

    def __post_init__(self) -> None:  # accept any sequence, store tuples (the record is frozen)
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "eps_curve", tuple(self.eps_curve))
        object.__setattr__(self, "attack_kwargs", dict(self.attack_kwargs or {}))


@dataclass
class _Tally:
    """What the batches add up to: per-point masks (on CPU), curve hits and the check subset."""

    alone: dict[str, list[Tensor]]
    curve_hits: dict[float, int]
    n: int = 0
    correct: list[Tensor] = field(default_factory=list)
    robust: list[Tensor] = field(default_factory=list)
    x_check: list[Tensor] = field(default_factory=list)
    y_check: list[Tensor] = field(default_factory=list)


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
    robust = torch.cat(tally.robust)
    flags = _masking_flags(model, s, params, tally, robust, generator)
    curve = {e: tally.curve_hits[e] / tally.n for e in curve_eps}
    per = {a: float(torch.cat(v).float().mean()) for a, v in tally.alone.items() if v}
    if len(curve) >= 2 and check_larger_eps(curve):
        flags["eps_not_decreasing"] = True
    return RobustnessResult(
        model_name=model_name,
        n=tally.n,
        clean_accuracy=float(torch.cat(tally.correct).float().mean()),
        robust_accuracy=per,
        worst_case_accuracy=float(robust.float().mean()),
        robust=robust,
        attacks=s.attacks,
        params=params,
        main_attack=s.main_attack,
        curve=curve,
        flags=flags,
        seed=generator.initial_seed(),
    )


def _attack_params(s: SuiteSettings) -> tuple[Params, list[float]]:
    """Each attack's keyword arguments and the sorted curve radii; fails before any work."""
    if not s.attacks:
        raise ValueError("attacks must name at least one attack")
    if len(set(s.attacks)) != len(s.attacks):
        raise ValueError(f"attacks contains duplicates: {s.attacks}")
    for name in (*s.attacks, s.main_attack, *s.attack_kwargs):
        get_attack(name)
    if s.batch_size < 1 or s.check_n < 0:
        raise ValueError(
            f"batch_size must be >= 1 and check_n >= 0, got {s.batch_size}, {s.check_n}"
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
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-attack mode: every attack alone on all clean-correct points; worst case = their AND."""
    alone = {name: _survives(model, name, x, y, correct, g, p) for name, p in params.items()}
    robust = correct.clone()
    for ok in alone.values():
        robust &= ok
    return alone, robust


def _attack_in_turn(
    model: nn.Module, x: Tensor, y: Tensor, correct: Tensor, g: torch.Generator, params: Params
) -> tuple[dict[str, Tensor], Tensor]:
    """AutoAttack mode: each attack only on the points no earlier attack fooled."""
    robust = correct
    for name, p in params.items():
        robust = _survives(model, name, x, y, robust, g, p)
    return {}, robust


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
    tally = _Tally(alone={a: [] for a in s.attacks}, curve_hits=dict.fromkeys(curve_eps, 0))
    for xb, yb in _batches(data, s.batch_size):
        xb, yb = xb.to(device), yb.to(device)
        validate_attack_args(xb, yb, eps=s.eps, step_size=s.step_size, steps=s.steps)
        if tally.n < s.check_n:
            tally.x_check.append(xb[: s.check_n - tally.n])
            tally.y_check.append(yb[: s.check_n - tally.n])
        tally.n += xb.shape[0]
        correct = _predict(model, xb) == yb
        alone, robust = attack_batch(model, xb, yb, correct, generator, suite)
        for e in curve_eps:
            if s.main_attack in alone and math.isclose(e, main["eps"]):
                hits = alone[s.main_attack]  # the curve point is the attack alone: reuse it
            else:
                p = {**main, "eps": e, "step_size": main["step_size"] * e / main["eps"]}
                hits = _survives(model, s.main_attack, xb, yb, correct, generator, p)
            tally.curve_hits[e] += int(hits.sum())
        for name, ok in alone.items():
            tally.alone[name].append(ok.cpu())
        tally.correct.append(correct.cpu())
        tally.robust.append(robust.cpu())
    if tally.n == 0:
        raise ValueError("no data: the loader yielded no points")
    return tally


def _masking_flags(
    model: nn.Module,
    s: SuiteSettings,
    params: Params,
    tally: _Tally,
    robust: Tensor,
    generator: torch.Generator,
) -> dict[str, bool | None]:
    """The masking checks on the first ``check_n`` points, against the white-box worst case."""
    flags: dict[str, bool | None] = dict.fromkeys(MASKING_FLAGS)
    if not (s.checks and s.check_n > 0):
        return flags
    xc, yc = torch.cat(tally.x_check), torch.cat(tally.y_check)
    white = [a for a in s.attacks if attack_spec(a).white_box]
    if s.per_attack and white:
        masks = [torch.cat(tally.alone[a])[: len(yc)] for a in white]
        wb_acc = float(torch.stack(masks).all(dim=0).float().mean())
    else:
        wb_acc = float(robust[: len(yc)].float().mean())
    main = params[s.main_attack]
    return run_masking_checks(
        model,
        xc,
        yc,
        eps=main["eps"],
        step_size=main["step_size"],
        steps=main["steps"],
        generator=generator,
        white_box_acc=wb_acc,
        norm=ATTACK_NORM[s.main_attack],
        black_box_queries=s.black_box_queries,
    )
