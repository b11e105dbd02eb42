"""Robustness evaluation: per-attack and worst-case accuracy, gradient-masking checks, results.

Implements the evaluation protocol of spec section 6.1: clean accuracy, robust accuracy under each
attack of :mod:`rarn.robust.attacks` (Eq. (1) of the spec), and the per-sample worst case over
the suite in the manner of AutoAttack (Croce and Hein 2020, https://arxiv.org/abs/2003.01690):
a boolean ``robust`` mask, robust accuracy ``robust.float().mean()``. Robustness numbers are
only worth
something when the gradients are not masked (Athalye et al. 2018, https://arxiv.org/abs/1802.00420;
Carlini et al. 2019, https://arxiv.org/abs/1902.06705), so every result carries the flags of six
named checks: outputs that are probabilities, zero input gradients, randomised outputs, accuracy
not decreasing with more PGD steps or with a larger eps, and a black-box attack (the Square-style
random search :func:`rarn.robust.attacks.square`) beating the white-box ones. Results are pyarrow
tables with a fixed schema (:data:`RESULTS_SCHEMA`, :data:`TRANSFER_SCHEMA`), written as Parquet,
with PNG plots of the accuracy-vs-eps curves and of source x target transfer matrices.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from rarn.models.common import device_of, eval_mode
from rarn.robust.attacks import ATTACK_IMPL, ATTACK_NORM, get_attack, validate_attack_args

__all__ = [
    "MASKING_FLAGS",
    "RESULTS_SCHEMA",
    "TRANSFER_SCHEMA",
    "GradientMaskingWarning",
    "RobustnessResult",
    "check_black_box",
    "check_larger_eps",
    "check_more_steps",
    "check_probability_outputs",
    "check_randomized",
    "check_zero_gradients",
    "evaluate_robustness",
    "plot_accuracy_vs_eps",
    "plot_transfer_heatmap",
    "results_table",
    "run_masking_checks",
    "transfer_matrix",
    "write_results",
]

logger = logging.getLogger(__name__)

Data = Iterable[Sequence[Tensor]] | tuple[Tensor, Tensor]
"""A loader yielding ``(x, y, ...)`` batches, or one ``(x, y)`` pair of tensors."""

MASKING_FLAGS: tuple[str, ...] = (
    "probability_outputs",
    "zero_gradients",
    "randomized_outputs",
    "steps_not_decreasing",
    "eps_not_decreasing",
    "black_box_stronger",
)
"""Names of the gradient-masking flags; the results table has a ``flag_<name>`` column for each."""

_UNBOUNDED_LINF = 0.5  # any image in [0, 1] is within 0.5 of mid-grey: nothing is robust there


class GradientMaskingWarning(UserWarning):
    """A check suggests the robust accuracy is inflated by masked or obfuscated gradients."""


def _warn(msg: str) -> None:
    # warnings, not logger.warning: one line, filterable; logging.captureWarnings routes them.
    warnings.warn(msg, GradientMaskingWarning, stacklevel=3)


# --- gradient-masking checks --------------------------------------------------------------------


def check_probability_outputs(model: nn.Module, x: Tensor) -> bool:
    """Flag a model whose outputs look like probabilities instead of logits.

    Rows in [0, 1] summing to 1 mean a softmax at the end: cross-entropy on them has vanishing
    gradients, so gradient attacks under-perform (AutoAttack's ``check_range_output``).

    Args:
        model: the classifier.
        x: a batch of inputs (N, C, H, W).

    Returns:
        True (and a :class:`GradientMaskingWarning`) when the outputs are probabilities.
    """
    with eval_mode(model), torch.no_grad():
        out = model(x).float()
    in_range = bool(out.min() >= 0) and bool(out.max() <= 1)
    flag = in_range and bool((out.sum(dim=1) - 1).abs().max() <= 1e-4)
    if flag:
        _warn("model outputs are probabilities (rows in [0, 1] summing to 1); attack logits")
    return flag


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor, *, tol: float = 0.0) -> bool:
    """Flag a model whose input gradient of the cross-entropy is exactly zero on some inputs.

    Args:
        model: the classifier (logits).
        x: inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        tol: largest fraction of samples allowed a zero gradient (default 0).

    Returns:
        True (and a warning) when more than ``tol`` of the samples have an all-zero gradient.
    """
    with eval_mode(model), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xg), y, reduction="sum")
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, xg, materialize_grads=True)
        else:
            grad = torch.zeros_like(xg)
    frac = float((grad.flatten(1).abs().amax(dim=1) == 0).float().mean())
    flag = frac > tol
    if flag:
        _warn(f"input gradients are exactly zero for {frac:.1%} of the samples")
    return flag


def check_randomized(model: nn.Module, x: Tensor, *, atol: float = 1e-5) -> bool:
    """Flag a model whose eval-mode outputs differ between two identical forward passes.

    Randomised defences need EOT attacks; plain PGD over-estimates their robustness.

    Args:
        model: the classifier.
        x: inputs (N, C, H, W).
        atol: absolute tolerance between the two passes (GPU kernels are not bitwise stable).

    Returns:
        True (and a warning) when the two passes differ.
    """
    with eval_mode(model), torch.no_grad():
        a, b = model(x), model(x)
    flag = not torch.allclose(a, b, rtol=1e-4, atol=atol)
    if flag:
        _warn("two forward passes in eval mode differ: the model is randomised (use EOT)")
    return flag


def _not_decreasing(accs: Sequence[float], tol: float, floor: float) -> bool:
    rises = any(later > earlier + tol for earlier, later in zip(accs, accs[1:]))
    flat = len(accs) >= 2 and accs[0] > floor and accs[-1] >= accs[0] - tol
    return rises or flat


def check_more_steps(
    acc_by_steps: Mapping[int, float], *, tol: float = 0.02, floor: float = 0.1
) -> bool:
    """Flag robust accuracy that does not fall with more attack steps (same attack and eps).

    Flags a rise of more than ``tol`` between consecutive step counts, or a curve that stays
    flat (within ``tol``) from the fewest to the most steps while above ``floor``: a working
    gradient attack gains a lot from 1 to k steps (Carlini et al. 2019, section 5.2).

    Args:
        acc_by_steps: steps -> robust accuracy, at least two step counts.
        tol: allowed rise, and how close counts as flat.
        floor: accuracy below which a flat curve is fine (the model is broken either way).

    Returns:
        True (and a :class:`GradientMaskingWarning`) on a rise or a flat curve.
    """
    flag = _not_decreasing([acc_by_steps[k] for k in sorted(acc_by_steps)], tol, floor)
    if flag:
        _warn(f"robust accuracy does not decrease with more PGD steps: {dict(acc_by_steps)}")
    return flag


def check_larger_eps(
    acc_by_eps: Mapping[float, float], *, tol: float = 0.02, floor: float = 0.1
) -> bool:
    """Flag robust accuracy that does not fall as eps grows.

    Same rule as :func:`check_more_steps` over radii: a rise of more than ``tol``, or a flat
    curve above ``floor``. :func:`run_masking_checks` includes the radius 0.5 (L-inf), where
    every image is within reach of mid-grey and no model can be robust (Carlini et al. 2019:
    unbounded attacks must succeed).

    Args:
        acc_by_eps: eps -> robust accuracy, at least two radii.
        tol: allowed rise, and how close counts as flat.
        floor: accuracy below which a flat curve is fine.

    Returns:
        True (and a warning) on a rise or a flat curve.
    """
    flag = _not_decreasing([acc_by_eps[k] for k in sorted(acc_by_eps)], tol, floor)
    if flag:
        _warn(f"robust accuracy does not decrease with larger eps: {dict(acc_by_eps)}")
    return flag


def check_black_box(white_box_acc: float, black_box_acc: float, *, tol: float = 0.02) -> bool:
    """Flag a black-box attack that is stronger than the white-box suite on the same points.

    Args:
        white_box_acc: worst-case robust accuracy under the white-box attacks.
        black_box_acc: robust accuracy under the black-box attack.
        tol: margin before flagging.

    Returns:
        True (and a warning) when the black-box accuracy is lower by more than ``tol``.
    """
    flag = black_box_acc < white_box_acc - tol
    if flag:
        _warn(f"black-box attack beats white-box: {black_box_acc:.3f} < {white_box_acc:.3f}")
    return flag


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return model(x).argmax(dim=1)


def _robust_acc(model: nn.Module, name: str, x: Tensor, y: Tensor, **params: Any) -> float:
    """Robust accuracy over all of ``x``; only clean-correct points are attacked."""
    ok = _predict(model, x) == y
    idx = ok.nonzero().squeeze(1)
    if idx.numel():
        x_adv = get_attack(name)(model, x[idx], y[idx], **params)
        ok[idx] = _predict(model, x_adv) == y[idx]
    return float(ok.float().mean())


def run_masking_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator,
    white_box_acc: float | None = None,
    norm: str = "linf",
    black_box_queries: int = 500,
    tol: float = 0.02,
) -> dict[str, bool | None]:
    """Run the six gradient-masking checks on one batch.

    Steps: PGD with 1 vs ``steps`` steps. Eps: PGD at ``eps`` vs an unbounded-looking radius
    (0.5 L-inf; the same per pixel in L2), step size scaled with eps. Black box: the Square-style
    :func:`rarn.robust.attacks.square` with ``black_box_queries`` queries against ``white_box_acc``
    (default: PGD's accuracy at ``eps``); L-inf only (``None`` for L2).

    Args:
        model: the classifier (logits).
        x: inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: threat-model radius.
        step_size: PGD step at ``eps``.
        steps: PGD steps.
        generator: randomness of the attacks.
        white_box_acc: worst-case white-box robust accuracy on the same points, if known.
        norm: "linf" or "l2".
        black_box_queries: queries of the black-box attack.
        tol: tolerance of the step, eps and black-box checks.

    Returns:
        Flag name (:data:`MASKING_FLAGS`) -> bool, or None when the check was not run.
    """
    attack = "pgd_l2" if norm == "l2" else "pgd"
    big = _UNBOUNDED_LINF * (math.sqrt(x[0].numel()) if norm == "l2" else 1.0)
    common = {"generator": generator}
    many = max(steps, 2)
    acc_1 = _robust_acc(model, attack, x, y, eps=eps, step_size=step_size, steps=1, **common)
    acc_k = _robust_acc(model, attack, x, y, eps=eps, step_size=step_size, steps=many, **common)
    big_step = step_size * big / eps
    acc_big = _robust_acc(model, attack, x, y, eps=big, step_size=big_step, steps=many, **common)
    flags: dict[str, bool | None] = {
        "probability_outputs": check_probability_outputs(model, x),
        "zero_gradients": check_zero_gradients(model, x, y),
        "randomized_outputs": check_randomized(model, x),
        "steps_not_decreasing": check_more_steps({1: acc_1, many: acc_k}, tol=tol),
        "eps_not_decreasing": check_larger_eps({eps: acc_k, big: acc_big}, tol=tol)
        if big > eps
        else None,
        "black_box_stronger": None,
    }
    if norm == "linf":
        bb = _robust_acc(
            model, "square", x, y, eps=eps, step_size=eps, steps=black_box_queries, **common
        )
        wb = acc_k if white_box_acc is None else min(white_box_acc, acc_k)
        flags["black_box_stronger"] = check_black_box(wb, bb, tol=tol)
    return flags


# --- evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RobustnessResult:
    """Outcome of :func:`evaluate_robustness` for one model.

    Attributes:
        model_name: label used in tables.
        n: number of evaluated points.
        clean_accuracy: accuracy on clean inputs.
        robust_accuracy: attack -> robust accuracy of that attack alone (empty if not computed).
        worst_case_accuracy: ``robust.float().mean()``.
        robust: (n,) bool on CPU, True where every attack of the suite failed.
        attacks: the suite, in order.
        params: attack -> effective ``eps``, ``step_size``, ``steps`` (and extra kwargs).
        main_attack: attack of the accuracy-vs-eps curve.
        curve: eps -> robust accuracy of ``main_attack``.
        flags: :data:`MASKING_FLAGS` -> bool, None where a check was not run.
        seed: initial seed of the generator.
    """

    model_name: str
    n: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    worst_case_accuracy: float
    robust: Tensor
    attacks: tuple[str, ...]
    params: dict[str, dict[str, Any]]
    main_attack: str
    curve: dict[float, float] = field(default_factory=dict)
    flags: dict[str, bool | None] = field(default_factory=dict)
    seed: int | None = None

    def to_table(self) -> pa.Table:
        """Rows: clean, each attack alone, worst case, and the curve (schema RESULTS_SCHEMA)."""
        return results_table([self])


def _batches(data: Data, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the number of points: {len(x)} vs {len(y)}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    for batch in data:
        yield batch[0], batch[1]


def _survives(
    model: nn.Module,
    name: str,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    generator: torch.Generator,
    params: Mapping[str, Any],
) -> Tensor:
    """Attack the points where ``mask`` holds; return where they are still classified right."""
    out = mask.clone()
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x_adv = get_attack(name)(model, x[idx], y[idx], generator=generator, **params)
        out[idx] = _predict(model, x_adv) == y[idx]
    return out


def _effective_steps(name: str, params: Mapping[str, Any]) -> int:
    if name == "fgsm":
        return 1
    if name == "autoattack":
        return int(params.get("n_iter", 100))
    return int(params["steps"])


def evaluate_robustness(
    model: nn.Module,
    data: Data,
    *,
    attacks: Sequence[str] = ("fgsm", "pgd", "mim", "cw"),
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 20,
    generator: torch.Generator | None = None,
    model_name: str = "model",
    per_attack: bool = True,
    main_attack: str = "pgd",
    eps_curve: Sequence[float] = (),
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    checks: bool = True,
    check_n: int = 256,
    black_box_queries: int = 500,
    batch_size: int = 256,
    device: torch.device | str | None = None,
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
        attacks: names from :data:`rarn.robust.attacks.ATTACKS`, run in this order.
        eps: threat-model radius shared by the suite.
        step_size: step size shared by the suite.
        steps: steps shared by the suite.
        generator: randomness of all attacks (None: seeded with 0); its seed is recorded.
        model_name: label for the results table.
        per_attack: also report each attack alone (see above).
        main_attack: attack of the accuracy-vs-eps curve.
        eps_curve: radii of the curve (step size scaled by ``eps_i / eps``); empty: no curve.
        attack_kwargs: per-attack overrides, e.g. ``{"pgd_l2": {"eps": 0.5}, "autoattack":
            {"n_iter": 10}}``.
        checks: run the gradient-masking checks on the first ``check_n`` points.
        check_n: size of the check subset.
        black_box_queries: query budget of the black-box check.
        batch_size: batch size when ``data`` is a pair of tensors.
        device: where to evaluate (None: the model's device).

    Returns:
        A :class:`RobustnessResult`.

    Raises:
        KeyError: an unknown attack name (listing the known ones).
        ValueError: invalid eps/step_size/steps, inputs outside [0, 1], or no data.
    """
    attacks = tuple(attacks)
    if not attacks:
        raise ValueError("attacks must name at least one attack")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks contains duplicates: {attacks}")
    for name in (*attacks, main_attack, *(attack_kwargs or {})):
        get_attack(name)
    if batch_size < 1 or check_n < 0:
        raise ValueError(f"batch_size must be >= 1 and check_n >= 0, got {batch_size}, {check_n}")
    params: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys((*attacks, main_attack)):
        params[name] = {"eps": eps, "step_size": step_size, "steps": steps}
        params[name].update((attack_kwargs or {}).get(name, {}))
    dummy = torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    for p in params.values():  # fail before any work, with the attack's own message
        validate_attack_args(*dummy, eps=p["eps"], step_size=p["step_size"], steps=p["steps"])
    curve_eps = sorted({float(e) for e in eps_curve})
    for e in curve_eps:
        validate_attack_args(*dummy, eps=e, step_size=step_size, steps=steps)
    if len({ATTACK_NORM[a] for a in attacks}) > 1:
        logger.warning("suite %s mixes L-inf and L2: the worst case is over their union", attacks)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    device = torch.device(device) if device is not None else device_of(model)

    correct_all, alone_all, robust_all = [], {a: [] for a in attacks}, []
    curve_hits = {e: 0 for e in curve_eps}
    xs_check, ys_check, n = [], [], 0
    main = params[main_attack]
    for xb, yb in _batches(data, batch_size):
        xb, yb = xb.to(device), yb.to(device)
        validate_attack_args(xb, yb, eps=eps, step_size=step_size, steps=steps)
        if n < check_n:
            xs_check.append(xb[: check_n - n])
            ys_check.append(yb[: check_n - n])
        n += xb.shape[0]
        correct = _predict(model, xb) == yb
        robust = correct.clone()
        for name in attacks:
            if per_attack:
                ok = _survives(model, name, xb, yb, correct, generator, params[name])
                alone_all[name].append(ok.cpu())
                robust &= ok
            else:
                robust = _survives(model, name, xb, yb, robust, generator, params[name])
        for e in curve_eps:
            if per_attack and main_attack in attacks and math.isclose(e, main["eps"]):
                hits = alone_all[main_attack][-1]
            else:
                p = {**main, "eps": e, "step_size": main["step_size"] * e / main["eps"]}
                hits = _survives(model, main_attack, xb, yb, correct, generator, p)
            curve_hits[e] += int(hits.sum())
        correct_all.append(correct.cpu())
        robust_all.append(robust.cpu())
    if n == 0:
        raise ValueError("no data: the loader yielded no points")

    robust = torch.cat(robust_all)
    per = {a: float(torch.cat(v).float().mean()) for a, v in alone_all.items() if v}
    flags: dict[str, bool | None] = dict.fromkeys(MASKING_FLAGS)
    if checks and check_n > 0:
        xc, yc = torch.cat(xs_check), torch.cat(ys_check)
        white = [a for a in attacks if a != "square"]
        if per_attack and white:
            masks = [torch.cat(alone_all[a])[: len(yc)] for a in white]
            wb_acc = float(torch.stack(masks).all(dim=0).float().mean())
        else:
            wb_acc = float(robust[: len(yc)].float().mean())
        flags = run_masking_checks(
            model,
            xc,
            yc,
            eps=main["eps"],
            step_size=main["step_size"],
            steps=main["steps"],
            generator=generator,
            white_box_acc=wb_acc,
            norm=ATTACK_NORM[main_attack],
            black_box_queries=black_box_queries,
        )
    curve = {e: curve_hits[e] / n for e in curve_eps}
    if len(curve) >= 2 and check_larger_eps(curve):
        flags["eps_not_decreasing"] = True
    return RobustnessResult(
        model_name=model_name,
        n=n,
        clean_accuracy=float(torch.cat(correct_all).float().mean()),
        robust_accuracy=per,
        worst_case_accuracy=float(robust.float().mean()),
        robust=robust,
        attacks=attacks,
        params=params,
        main_attack=main_attack,
        curve=curve,
        flags=flags,
        seed=generator.initial_seed(),
    )


# --- results tables -----------------------------------------------------------------------------


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


_COMMON = [
    _f("attack", pa.string(), "attack name (rarn.robust.attacks.ATTACKS), 'clean' or 'worst_case'"),
    _f("norm", pa.string(), "threat model of eps: 'linf', 'l2', 'none' (clean) or 'mixed'"),
    _f("eps", pa.float64(), "radius of the threat model (0 for clean)"),
    _f("step_size", pa.float64(), "attack step size (0 for clean and worst_case)"),
    _f("steps", pa.int64(), "attack iterations actually run (FGSM 1, AutoAttack n_iter)"),
    _f("accuracy", pa.float64(), "fraction of the n points classified correctly"),
    _f("n", pa.int64(), "number of evaluated points"),
    _f("implementation", pa.string(), "who implements the attack: 'rarn' or 'torchattacks'"),
    _f("impl_version", pa.string(), "version of that implementation"),
    _f("seed", pa.uint64(), "initial seed of the attack generator", nullable=True),
]
RESULTS_SCHEMA = pa.schema(
    [
        _f("model", pa.string(), "model label"),
        *_COMMON,
        _f("suite", pa.string(), "attacks of the worst case, '+'-joined, in order"),
        *(
            _f(f"flag_{k}", pa.bool_(), f"masking check {k}; null: not run", True)
            for k in MASKING_FLAGS
        ),
        _f("masking_suspected", pa.bool_(), "any flag raised; null: no check run", True),
    ],
    metadata={"rarn.schema": "robustness-results/1"},
)
"""One row per model x attack x eps (clean, each attack alone, worst case, curve points)."""

TRANSFER_SCHEMA = pa.schema(
    [
        _f("source", pa.string(), "model the adversarial examples were crafted on"),
        _f("target", pa.string(), "model evaluated on them (source == target: white-box)"),
        *_COMMON,
    ],
    metadata={"rarn.schema": "transfer-matrix/1"},
)
"""One row per source x target model pair."""


def _attack_row(name: str, p: Mapping[str, Any]) -> dict[str, Any]:
    impl, version = ATTACK_IMPL[name]
    return {
        "attack": name,
        "norm": ATTACK_NORM[name],
        "eps": float(p["eps"]),
        "step_size": float(p["step_size"]),
        "steps": _effective_steps(name, p),
        "implementation": impl,
        "impl_version": version,
    }


def results_table(results: Iterable[RobustnessResult]) -> pa.Table:
    """Stack results into one table with schema :data:`RESULTS_SCHEMA`.

    Args:
        results: evaluated models.

    Returns:
        The table (clean row, one row per attack alone, the worst case, the curve points).
    """
    rows = []
    rarn_impl = ATTACK_IMPL["pgd"]
    for r in results:
        suite = "+".join(r.attacks)
        norms = {ATTACK_NORM[a] for a in r.attacks}
        same = {r.params[a]["eps"] for a in r.attacks}
        base = {
            "model": r.model_name,
            "n": r.n,
            "seed": r.seed,
            "suite": suite,
            **{f"flag_{k}": r.flags.get(k) for k in MASKING_FLAGS},
            "masking_suspected": any(bool(r.flags.get(k)) for k in MASKING_FLAGS)
            if any(r.flags.get(k) is not None for k in MASKING_FLAGS)
            else None,
        }
        clean = {"attack": "clean", "norm": "none", "eps": 0.0, "step_size": 0.0, "steps": 0}
        rows.append({**base, **clean, "accuracy": r.clean_accuracy})
        for a, acc in r.robust_accuracy.items():
            rows.append({**base, **_attack_row(a, r.params[a]), "accuracy": acc})
        worst = {
            "attack": "worst_case",
            "norm": norms.pop() if len(norms) == 1 else "mixed",
            "eps": same.pop() if len(same) == 1 else math.nan,
            "step_size": 0.0,
            "steps": 0,
        }
        rows.append({**base, **worst, "accuracy": r.worst_case_accuracy})
        main = r.params[r.main_attack]
        for e, acc in r.curve.items():
            if r.main_attack in r.robust_accuracy and math.isclose(e, main["eps"]):
                continue  # already a row
            p = {**main, "eps": e, "step_size": main["step_size"] * e / main["eps"]}
            rows.append({**base, **_attack_row(r.main_attack, p), "accuracy": acc})
    for row in rows:
        row.setdefault("implementation", rarn_impl[0])
        row.setdefault("impl_version", rarn_impl[1])
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def transfer_matrix(
    models: Mapping[str, nn.Module],
    data: Data,
    *,
    attack: str = "pgd",
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 20,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    attack_kwargs: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Black-box transfer: craft on each source model, evaluate on every target model.

    Args:
        models: name -> classifier (logits); each is evaluated on its own device.
        data: a loader of ``(x, y, ...)`` batches or one ``(x, y)`` pair.
        attack: attack used on the sources.
        eps: threat-model radius.
        step_size: attack step size.
        steps: attack steps.
        generator: randomness (None: seeded with 0).
        batch_size: batch size when ``data`` is a pair of tensors.
        attack_kwargs: extra keyword arguments of the attack.

    Returns:
        Table with schema :data:`TRANSFER_SCHEMA`: target accuracy on all n points (the
        diagonal is white-box robust accuracy counting clean errors).

    Raises:
        KeyError: unknown attack. ValueError: no models, bad parameters, or no data.
    """
    fn = get_attack(attack)
    if not models:
        raise ValueError("models must hold at least one model")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    p = {"eps": eps, "step_size": step_size, "steps": steps, **(attack_kwargs or {})}
    dummy = torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
    validate_attack_args(*dummy, eps=p["eps"], step_size=p["step_size"], steps=p["steps"])
    hits = {(s, t): 0 for s in models for t in models}
    n = 0
    for xb, yb in _batches(data, batch_size):
        n += xb.shape[0]
        for s, src in models.items():
            dev = device_of(src)
            x_adv = fn(src, xb.to(dev), yb.to(dev), generator=generator, **p)
            for t, tgt in models.items():
                dt = device_of(tgt)
                hits[s, t] += int((_predict(tgt, x_adv.to(dt)) == yb.to(dt)).sum())
    if n == 0:
        raise ValueError("no data: the loader yielded no points")
    base = {**_attack_row(attack, p), "n": n, "seed": generator.initial_seed()}
    rows = [{"source": s, "target": t, **base, "accuracy": h / n} for (s, t), h in hits.items()]
    return pa.Table.from_pylist(rows, schema=TRANSFER_SCHEMA)


def _checked(table: pa.Table) -> pa.Table:
    for schema in (RESULTS_SCHEMA, TRANSFER_SCHEMA):
        if table.schema.equals(schema, check_metadata=False):
            break
    else:
        raise ValueError(
            "table schema is neither RESULTS_SCHEMA nor TRANSFER_SCHEMA:\n" + str(table.schema)
        )
    if table.num_rows == 0:
        raise ValueError("refusing to write an empty results table")
    acc = table.column("accuracy").to_pylist()
    if any(not (0.0 <= a <= 1.0) for a in acc):
        raise ValueError(f"accuracies must lie in [0, 1], got {acc}")
    return table.cast(schema)


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_results(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Validate ``table`` against its schema and write it as Parquet, atomically.

    Args:
        table: a table with :data:`RESULTS_SCHEMA` or :data:`TRANSFER_SCHEMA`.
        path: destination ``.parquet`` file (parent folders are created).

    Returns:
        The written path.

    Raises:
        ValueError: wrong schema, no rows or accuracies outside [0, 1]; nothing is written.
    """
    table, path = _checked(table), Path(path)
    tmp = _atomic_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _save_figure(fig: Any, path: Path) -> Path:
    tmp = _atomic_path(path)
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_accuracy_vs_eps(
    table: pa.Table, path: str | os.PathLike[str], *, attack: str | None = None
) -> Path:
    """PNG of accuracy vs eps: one line per model x attack with at least two radii.

    Each line starts at eps = 0 with the model's clean accuracy. Uses matplotlib's object API
    (Agg canvas, no pyplot state), imported here.

    Args:
        table: a :data:`RESULTS_SCHEMA` table.
        path: destination ``.png``.
        attack: plot only this attack (default: every attack with a curve).

    Returns:
        The written path.

    Raises:
        ValueError: wrong schema or nothing to plot; nothing is written.
    """
    from matplotlib.figure import Figure

    rows = _checked(table).to_pylist()
    if "source" in rows[0]:
        raise ValueError("plot_accuracy_vs_eps needs a RESULTS_SCHEMA table")
    clean = {r["model"]: r["accuracy"] for r in rows if r["attack"] == "clean"}
    lines: dict[tuple[str, str], dict[float, float]] = {}
    for r in rows:
        if r["attack"] in ("clean", "worst_case") or attack not in (None, r["attack"]):
            continue
        lines.setdefault((r["model"], r["attack"]), {})[r["eps"]] = r["accuracy"]
    lines = {k: v for k, v in lines.items() if len(v) >= 2}
    if not lines:
        raise ValueError("no model x attack has accuracies at two or more radii")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for (model, name), pts in sorted(lines.items()):
        if model in clean:
            pts = {0.0: clean[model], **pts}
        eps_sorted = sorted(pts)
        ax.plot(eps_sorted, [pts[e] for e in eps_sorted], marker="o", label=f"{model} / {name}")
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, Path(path))


def plot_transfer_heatmap(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """PNG heatmap of a transfer matrix (rows: source, columns: target, cells: accuracy).

    Args:
        table: a :data:`TRANSFER_SCHEMA` table.
        path: destination ``.png``.

    Returns:
        The written path.

    Raises:
        ValueError: wrong schema; nothing is written.
    """
    from matplotlib.figure import Figure

    rows = _checked(table).to_pylist()
    if "source" not in rows[0]:
        raise ValueError("plot_transfer_heatmap needs a TRANSFER_SCHEMA table")
    sources = sorted({r["source"] for r in rows})
    targets = sorted({r["target"] for r in rows})
    acc = {(r["source"], r["target"]): r["accuracy"] for r in rows}
    grid = [[acc.get((s, t), math.nan) for t in targets] for s in sources]
    fig = Figure(figsize=(1.2 * len(targets) + 2.5, 1.0 * len(sources) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k")
    fig.colorbar(im, ax=ax, label="accuracy")
    return _save_figure(fig, Path(path))
