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
flag; :func:`run_masking_checks` runs them all on one batch. docs/evaluation.md has what each
catches, with numbers measured on models built to mask gradients.

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
from typing import Any

import torch
from torch import Tensor, nn

from rarn.models.common import eval_mode
from rarn.robust.attacks.gradient import input_gradient
from rarn.robust.evaluation._core import _attack_preds, _predict, attack_seed, batch_generator

__all__ = [  # in the order of MASKING_FLAGS
    "MASKING_FLAGS",
    "GradientMaskingWarning",
    "check_probability_outputs",
    "check_zero_gradients",
    "check_randomized",
    "check_more_steps",
    "check_more_steps_stronger",
    "check_fgsm_vs_pgd",
    "check_larger_eps",
    "check_black_box",
    "check_black_box_per_image",
    "MIN_POINTS",
    "UNBOUNDED_LINF",
    "unbounded_radius",
    "run_masking_checks",
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


def run_masking_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator,
    eps: float,
    step_size: float,
    steps: int,
    white_box_robust: Tensor | None = None,
    norm: str = "linf",
    black_box_queries: int = 500,
    more_steps_factor: int = 5,
    tol: float = 0.02,
    seed: int | None = None,
    evidence: dict[str, tuple[str, dict[str, Any], Tensor]] | None = None,
) -> dict[str, bool | None]:
    """Run the gradient-masking checks on one batch.

    Steps: PGD with 1 vs ``steps`` steps, and ``steps`` vs ``more_steps_factor * steps``. FGSM
    vs PGD-``steps`` (L-inf only). Eps: PGD at ``eps`` vs :func:`unbounded_radius`, step size
    scaled with eps. Black box: the Square-style :func:`rarn.robust.attacks.square` with
    ``black_box_queries`` queries against the white-box evidence, per image and in aggregate;
    L-inf only (``None`` for L2). The white-box evidence is ``white_box_robust`` AND this check's
    PGD-``steps``.

    Args:
        model: the classifier (logits).
        x: inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        generator: randomness of the attacks.
        eps: threat-model radius.
        step_size: PGD step at ``eps``.
        steps: PGD steps.
        white_box_robust: (N,) bool, True where the suite's white-box attacks all failed, if
            known.
        norm: "linf" or "l2".
        black_box_queries: queries of the black-box attack.
        more_steps_factor: how many times the steps of the more-steps check (>= 2).
        tol: tolerance of the 1-vs-k steps, FGSM, eps and aggregate black-box checks (the
            more-steps and per-image checks keep their own defaults).
        seed: when given, each check attack draws from its own generator
            (:func:`~rarn.robust.evaluation._core.attack_seed` of ``seed`` and its label, batch 0
            on ``generator``'s device) instead of sharing ``generator``.
        evidence: filled with label -> ``(registry key, params, predicted labels)`` of every
            check attack at ``eps`` (predictions -1 where not run: misclassified clean), so that
            the suite folds them into its worst case; labels ``check.<attack><steps>``.

    Returns:
        Flag name (:data:`MASKING_FLAGS`) -> bool, or None when the check was not run.
    """
    if more_steps_factor < 2:
        raise ValueError(f"more_steps_factor must be >= 2, got {more_steps_factor}")
    attack = "pgd_l2" if norm == "l2" else "pgd"
    big, many, n = unbounded_radius(norm, x[0].numel()), max(steps, 2), len(y)
    correct = _predict(model, x) == y

    def survives(name: str, e: float, k: int, **extra: Any) -> Tensor:
        params = {"eps": e, "step_size": step_size * e / eps, "steps": k, **extra}
        label = f"check.{name}{k if name != 'fgsm' else ''}" + ("" if e == eps else "@large")
        g = (
            generator
            if seed is None
            else batch_generator(attack_seed(seed, label), 0, generator.device)
        )
        preds = _attack_preds(model, name, x, y, correct, g, params)
        if evidence is not None and e == eps:
            evidence[label] = (name, params, preds)
        return preds == y

    def acc(mask: Tensor) -> float:
        return int(mask.sum()) / n

    robust_k = survives(attack, eps, many)
    acc_k = acc(robust_k)
    flags: dict[str, bool | None] = dict.fromkeys(MASKING_FLAGS)
    flags["probability_outputs"] = check_probability_outputs(model, x)
    flags["zero_gradients"] = check_zero_gradients(model, x, y)
    flags["randomized_outputs"] = check_randomized(model, x)
    acc_1 = acc(survives(attack, eps, 1))
    flags["steps_not_decreasing"] = check_more_steps({1: acc_1, many: acc_k}, tol=tol)
    acc_more = acc(survives(attack, eps, many * more_steps_factor))
    flags["more_steps_stronger"] = check_more_steps_stronger(acc_k, acc_more, n=n)
    if big > eps:
        curve = {eps: acc_k, big: acc(survives(attack, big, many))}
        flags["eps_not_decreasing"] = check_larger_eps(curve, tol=tol, large_eps=big)
    if norm == "linf":
        fgsm = acc(survives("fgsm", eps, 1))
        flags["fgsm_beats_pgd"] = check_fgsm_vs_pgd(fgsm, acc_k, tol=tol, n=n)
        square = survives("square", eps, black_box_queries)
        wb = robust_k if white_box_robust is None else white_box_robust.to(robust_k) & robust_k
        flags["black_box_stronger"] = check_black_box(acc(wb), acc(square), tol=tol)
        flags["black_box_breaks_robust"] = check_black_box_per_image(wb, square)
    return flags
