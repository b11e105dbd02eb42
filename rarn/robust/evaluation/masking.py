"""Gradient-masking checks: is a robust accuracy real, or are the gradients masked?

Robustness numbers are only worth something when the gradients are not masked (Athalye et al.
2018, https://arxiv.org/abs/1802.00420; Carlini et al. 2019, https://arxiv.org/abs/1902.06705).
Six named checks, in the manner of AutoAttack's (Croce and Hein 2020): outputs that are
probabilities, zero input gradients, randomised outputs, accuracy not decreasing with more PGD
steps or with a larger eps, and a black-box attack (the Square-style random search
:func:`rarn.robust.attacks.square`) beating the white-box ones. Each warns with a
:class:`GradientMaskingWarning` and returns a flag; :func:`run_masking_checks` runs all six.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from rarn.models.common import eval_mode
from rarn.robust.attacks.gradient import input_gradient
from rarn.robust.evaluation._core import _predict, _survives

__all__ = [  # in the order of MASKING_FLAGS
    "MASKING_FLAGS",
    "GradientMaskingWarning",
    "check_probability_outputs",
    "check_zero_gradients",
    "check_randomized",
    "check_more_steps",
    "check_larger_eps",
    "check_black_box",
    "run_masking_checks",
]

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
        grad = input_gradient(model, x, y)  # summed cross-entropy, as the attacks use
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


def run_masking_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator,
    eps: float,
    step_size: float,
    steps: int,
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
        generator: randomness of the attacks.
        eps: threat-model radius.
        step_size: PGD step at ``eps``.
        steps: PGD steps.
        white_box_acc: worst-case white-box robust accuracy on the same points, if known.
        norm: "linf" or "l2".
        black_box_queries: queries of the black-box attack.
        tol: tolerance of the step, eps and black-box checks.

    Returns:
        Flag name (:data:`MASKING_FLAGS`) -> bool, or None when the check was not run.
    """
    attack = "pgd_l2" if norm == "l2" else "pgd"
    big = _UNBOUNDED_LINF * (math.sqrt(x[0].numel()) if norm == "l2" else 1.0)
    many = max(steps, 2)

    def acc(name: str, e: float, step: float, n: int) -> float:  # over all x; only correct attacked
        params = {"eps": e, "step_size": step, "steps": n}
        ok = _survives(model, name, x, y, _predict(model, x) == y, generator, params)
        return float(ok.float().mean())

    acc_1 = acc(attack, eps, step_size, 1)
    acc_k = acc(attack, eps, step_size, many)
    acc_big = acc(attack, big, step_size * big / eps, many)
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
        bb = acc("square", eps, eps, black_box_queries)
        wb = acc_k if white_box_acc is None else min(white_box_acc, acc_k)
        flags["black_box_stronger"] = check_black_box(wb, bb, tol=tol)
    return flags
