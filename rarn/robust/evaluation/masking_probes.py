"""Gradient-masking checks that run the model: three probes of its outputs and input gradients
(:func:`check_probability_outputs`, :func:`check_zero_gradients`, :func:`check_randomized`) and
:func:`run_masking_checks`, which attacks one batch and feeds every comparison of
:mod:`rarn.robust.evaluation.masking` (the flags, their tolerances and what each catches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rarn.models.common import eval_mode
from rarn.robust.attacks.gradient import input_gradient
from rarn.robust.evaluation._core import _attack_preds, _predict, attack_seed, batch_generator
from rarn.robust.evaluation.masking import (
    MASKING_FLAGS,
    _warn,
    check_black_box,
    check_black_box_per_image,
    check_fgsm_vs_pgd,
    check_larger_eps,
    check_more_steps,
    check_more_steps_stronger,
    unbounded_radius,
)

__all__ = [
    "check_probability_outputs",
    "check_randomized",
    "check_zero_gradients",
    "run_masking_checks",
]


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
    many = max(steps, 2)
    survives = _check_attacks(model, x, y, generator, eps, step_size, seed, evidence)
    robust_k = survives(attack, eps, many)
    flags: dict[str, bool | None] = dict.fromkeys(MASKING_FLAGS)
    flags["probability_outputs"] = check_probability_outputs(model, x)
    flags["zero_gradients"] = check_zero_gradients(model, x, y)
    flags["randomized_outputs"] = check_randomized(model, x)
    flags.update(
        _attack_flags(survives, robust_k, attack, eps, many, norm, x[0].numel(),
                      more_steps_factor, black_box_queries, white_box_robust, tol)
    )  # fmt: skip
    return flags


Survives = Callable[..., Tensor]
"""``(attack, eps, steps, **params) -> (N,) bool``: where the check attack failed."""


def _check_attacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    generator: torch.Generator,
    eps: float,
    step_size: float,
    seed: int | None,
    evidence: dict[str, tuple[str, dict[str, Any], Tensor]] | None,
) -> Survives:
    """The checks' attack runner on the batch (clean-correct images only): step size scaled
    with eps, labels ``check.<attack><steps>[@large]``, evidence at ``eps`` recorded."""
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

    return survives


def _attack_flags(
    survives: Survives,
    robust_k: Tensor,
    attack: str,
    eps: float,
    many: int,
    norm: str,
    image_numel: int,
    more_steps_factor: int,
    black_box_queries: int,
    white_box_robust: Tensor | None,
    tol: float,
) -> dict[str, bool]:
    """The flags that compare attacks: steps, eps, FGSM and the black box (L-inf only)."""
    n = len(robust_k)

    def acc(mask: Tensor) -> float:
        return int(mask.sum()) / n

    flags, acc_k, big = {}, acc(robust_k), unbounded_radius(norm, image_numel)
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
