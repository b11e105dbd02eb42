"""Gradient-masking checks: is a robust accuracy real, or are the gradients masked?

Robustness numbers are only worth something when the gradients are not masked (Athalye et al.
2018, https://arxiv.org/abs/1802.00420; Carlini et al. 2019, https://arxiv.org/abs/1902.06705).
Nine named checks (:data:`MASKING_FLAGS`), in the manner of AutoAttack's (Croce and Hein 2020)
and of Carlini et al.'s checklist: outputs that are probabilities, zero input gradients,
randomised outputs; robust accuracy that does not fall from 1 to k PGD steps, that falls a lot
more with 5x the steps (the suite's PGD has not converged), FGSM stronger than PGD, accuracy that
does not approach 0 as eps grows; and a black-box attack (the Square-style random search
:func:`rarn.robust.attacks.square`) stronger than the white-box suite, in aggregate or on images
every white-box attack failed on. Each warns with a :class:`GradientMaskingWarning` and returns a
flag. The three that probe the model itself and the runner,
:func:`~rarn.robust.evaluation.masking_probes.run_masking_checks` (all of them on one batch), are
in :mod:`~rarn.robust.evaluation.masking_probes`; here are the flags and the comparisons of
accuracies. docs/evaluation.md has what each catches, with numbers measured on models built to
mask gradients.

Count-based tolerances: a check comparing two attacks on n images flags a gap of more than
``tol`` *and* of at least :data:`MIN_POINTS` images (one or two images on a small check subset
can be the luck of a random start). ``tol`` is 2 points of accuracy for FGSM vs PGD, 3 points for
5x the PGD steps (healthy models gain up to about 2: PGD-20 -> PGD-100 about 1 point on robust
CIFAR models, Madry et al. 2018, Rice et al. 2020; 2.3 points PGD-10 -> PGD-50 on the test suite's
digits net) and 1 % of the images for the per-image black-box check (Square adds well under 1 %
to a PGD suite on a healthy model; 0 images of 160 on the digits net).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

from torch import Tensor

__all__ = [  # in the order of MASKING_FLAGS
    "MASKING_FLAGS",
    "GradientMaskingWarning",
    "check_more_steps",
    "check_more_steps_stronger",
    "check_fgsm_vs_pgd",
    "check_larger_eps",
    "check_black_box",
    "check_black_box_per_image",
    "MIN_POINTS",
    "UNBOUNDED_LINF",
    "unbounded_radius",
]

MASKING_FLAGS: tuple[str, ...] = (
    "probability_outputs",
    "zero_gradients",
    "randomized_outputs",
    "steps_not_decreasing",
    "more_steps_stronger",
    "fgsm_beats_pgd",
    "eps_not_decreasing",
    "black_box_stronger",
    "black_box_breaks_robust",
)
"""Names of the gradient-masking flags; the results table has a ``flag_<name>`` column for each."""

UNBOUNDED_LINF = 0.5
"""An L-inf radius where no model is robust: every image in [0, 1] is within 0.5 of mid-grey."""

MIN_POINTS = 3
"""Fewest images a gap between two attacks must amount to before a count-based check flags."""


def unbounded_radius(norm: str, image_numel: int) -> float:
    """:data:`UNBOUNDED_LINF` in ``norm``: in L2 the same per pixel, times sqrt(C * H * W)."""
    return UNBOUNDED_LINF * (math.sqrt(image_numel) if norm == "l2" else 1.0)


class GradientMaskingWarning(UserWarning):
    """A check suggests the robust accuracy is inflated by masked or obfuscated gradients."""


def _warn(msg: str) -> None:
    # warnings, not logger.warning: one line, filterable; logging.captureWarnings routes them.
    warnings.warn(msg, GradientMaskingWarning, stacklevel=3)


def _not_decreasing(accs: Sequence[float], tol: float, floor: float) -> bool:
    rises = any(later > earlier + tol for earlier, later in zip(accs, accs[1:]))
    flat = len(accs) >= 2 and accs[0] > floor and accs[-1] >= accs[0] - tol
    return rises or flat


def _flag_gap(low: float, high: float, tol: float, n: int | None, msg: str) -> bool:
    """``low < high - tol`` and, when ``n`` is known, by at least :data:`MIN_POINTS` images."""
    gap = high - low
    flag = gap > tol and (n is None or round(gap * n) >= MIN_POINTS)
    if flag:
        warnings.warn(msg, GradientMaskingWarning, stacklevel=3)
    return flag


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


def check_more_steps_stronger(
    acc: float, acc_more: float, *, tol: float = 0.03, n: int | None = None
) -> bool:
    """Flag PGD with many more steps (e.g. PGD-100) clearly below the suite's PGD (PGD-20).

    A converged attack gains little from 5x the steps (healthy models: up to about two points,
    hence ``tol``); a big gain means the suite's numbers are not converged, typically because
    noisy or shattered gradients slow the ascent. ``acc`` is the robust accuracy with the
    suite's steps, ``acc_more`` with more steps (same eps, step size and images); the drop must
    exceed ``tol`` and, when the number of images ``n`` is given, amount to :data:`MIN_POINTS`
    images.

    Returns:
        True (and a :class:`GradientMaskingWarning`) on such a drop.
    """
    msg = f"more PGD steps lower robust accuracy from {acc:.3f} to {acc_more:.3f}"
    return _flag_gap(acc_more, acc, tol, n, msg)


def check_fgsm_vs_pgd(
    fgsm_acc: float, pgd_acc: float, *, tol: float = 0.02, n: int | None = None
) -> bool:
    """Flag FGSM (one step) clearly stronger than PGD (many steps) at the same eps.

    Iterating can only help a gradient attack whose gradients are informative; when one step
    from the clean point beats it, the gradients away from the data are masked (Athalye et al.).

    Args:
        fgsm_acc: robust accuracy under FGSM.
        pgd_acc: robust accuracy under PGD, same eps and images.
        tol: largest allowed gap.
        n: number of images (None: judge the accuracies alone).

    Returns:
        True (and a warning) when ``fgsm_acc < pgd_acc - tol`` by at least :data:`MIN_POINTS`
        images.
    """
    msg = f"FGSM beats PGD: robust accuracy {fgsm_acc:.3f} < {pgd_acc:.3f}"
    return _flag_gap(fgsm_acc, pgd_acc, tol, n, msg)


def check_larger_eps(
    acc_by_eps: Mapping[float, float],
    *,
    tol: float = 0.02,
    floor: float = 0.1,
    large_eps: float = UNBOUNDED_LINF,
    max_large_acc: float = 0.05,
) -> bool:
    """Flag robust accuracy that does not fall as eps grows, or does not approach 0.

    Same rule as :func:`check_more_steps` over radii (a rise of more than ``tol``, or a flat curve
    above ``floor``), and every radius of at least ``large_eps`` (default 0.5 L-inf, where every
    image is within reach of mid-grey; :func:`unbounded_radius` gives it in L2) must leave at most
    ``max_large_acc``: unbounded attacks must succeed (Carlini et al. 2019). A curve 0.60 -> 0.55
    up to eps 0.5 decreases, but is masking.

    Args:
        acc_by_eps: eps -> robust accuracy, at least two radii.
        tol: allowed rise, and how close counts as flat.
        floor: accuracy below which a flat curve is fine.
        large_eps: radius from which the accuracy must be near 0.
        max_large_acc: most accuracy allowed there.

    Returns:
        True (and a warning) on a rise, a flat curve, or accuracy above ``max_large_acc`` at a
        large radius.
    """
    flag = _not_decreasing([acc_by_eps[k] for k in sorted(acc_by_eps)], tol, floor)
    if flag:
        _warn(f"robust accuracy does not decrease with larger eps: {dict(acc_by_eps)}")
    high = {e: a for e, a in acc_by_eps.items() if e >= large_eps and a > max_large_acc}
    if high:
        _warn(f"robust accuracy does not approach 0 with larger eps: {high} > {max_large_acc}")
    return flag or bool(high)


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


def check_black_box_per_image(
    white_box_robust: Tensor, black_box_robust: Tensor, *, tol: float = 0.01
) -> bool:
    """Flag images the black-box attack fools although every white-box attack failed on them.

    Image by image, not in aggregate: a black box that is weaker overall can still break images
    the white-box suite cannot, and each such image is evidence that the gradients mislead there.

    Args:
        white_box_robust: (n,) bool, True where every white-box attack failed.
        black_box_robust: (n,) bool, True where the black-box attack failed, same images.
        tol: largest allowed fraction of such images.

    Returns:
        True (and a warning) when their count is at least :data:`MIN_POINTS` and above
        ``tol * n``.
    """
    count = int((white_box_robust & ~black_box_robust).sum())
    n = white_box_robust.numel()
    flag = count >= MIN_POINTS and count > tol * n
    if flag:
        _warn(f"black-box attack fools {count} of {n} images every white-box attack failed on")
    return flag
