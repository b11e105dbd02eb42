"""Adaptive attacks when a gradient-masking check fires, folded into the worst case.

A flag says a number may be inflated; an adaptive attack (Athalye et al. 2018, Tramer et al.
2020, https://arxiv.org/abs/2002.08347) says by how much. When a check of
:mod:`~rarn.robust.evaluation.masking` fires, :func:`adaptive_plan` picks:

* **BPDA-PGD** (:func:`rarn.robust.attacks.bpda`, ``more_steps_factor`` x the suite's PGD steps)
  for every flag but ``randomized_outputs``: non-differentiable or shattered input transforms;
* **EOT-PGD** (:func:`rarn.robust.attacks.pgd_eot`, ``eot_samples`` passes per step) for
  ``randomized_outputs``;
* a **longer Square** (``adaptive_square_queries``, default 5,000) for every flag: it needs no
  gradient at all.

Each runs on every image still robust after the suite and the checks (AutoAttack's survivors),
in chunks of ``batch_size`` (chunk ``b`` draws from the attack's generator for batch ``b``, so a
row can be rerun alone), and enters the per-image worst case. A flag's outcome is
``"confirmed"`` when the adaptive attacks it triggered fooled at least :data:`MIN_POINTS` images
(and more than 1 % of them) that survived everything before, ``"refuted"`` otherwise: they found
nothing the suite and the checks had not (the checks' own attacks are in the worst case either
way). L-inf suites only: in L2 the flags stand unanswered (``outcome`` None).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rarn.robust.evaluation._core import _attack_preds, attack_seed, batch_generator
from rarn.robust.evaluation.masking import MASKING_FLAGS, MIN_POINTS
from rarn.robust.evaluation.named import NamedAttack

__all__ = ["TRIGGERS", "adaptive_plan", "flag_outcomes", "run_adaptive"]

TRIGGERS: dict[str, tuple[str, ...]] = {
    "bpda": tuple(f for f in MASKING_FLAGS if f != "randomized_outputs"),
    "pgd_eot": ("randomized_outputs",),
    "square": MASKING_FLAGS,  # a longer black-box attack answers every flag
}
"""Adaptive attack (registry key) -> the flags that call for it."""


def adaptive_plan(
    flags: dict[str, bool | None], s: Any, main: NamedAttack, norm: str
) -> tuple[NamedAttack, ...]:
    """The adaptive attacks the raised ``flags`` call for (empty: none raised, or L2).

    ``s`` is the :class:`~rarn.robust.evaluation.SuiteSettings` (``more_steps_factor``,
    ``eot_samples``, ``adaptive_square_queries``), ``main`` the suite's PGD (eps, step size,
    steps).
    """
    raised = {k for k, v in flags.items() if v}
    if not raised or norm != "linf":
        return ()
    eps, step, steps = (main.params[k] for k in ("eps", "step_size", "steps"))
    entries = {
        "bpda": NamedAttack(
            "adaptive.bpda",
            "bpda",
            {"eps": eps, "step_size": step, "steps": steps * s.more_steps_factor},
        ),
        "pgd_eot": NamedAttack(
            "adaptive.eot",
            "pgd_eot",
            {"eps": eps, "step_size": step, "steps": steps, "samples": s.eot_samples},
        ),
        "square": NamedAttack(
            f"adaptive.square{s.adaptive_square_queries}",
            "square",
            {"eps": eps, "step_size": step, "steps": s.adaptive_square_queries},
        ),
    }
    return tuple(a for k, a in entries.items() if raised & set(TRIGGERS[k]))


def run_adaptive(
    model: nn.Module,
    plan: tuple[NamedAttack, ...],
    index: Tensor,
    x: Tensor,
    y: Tensor,
    robust: Tensor,
    *,
    seed: int,
    batch_size: int,
    device: torch.device,
    generator_device: torch.device | str = "cpu",
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Run ``plan`` in turn on the images still robust, in chunks of ``batch_size``.

    Args:
        index: (m,) int64, the image numbers of ``x`` / ``y`` (images robust after the suite).
        x: (m, C, H, W) those images, on any device.
        y: (m,) their labels.
        robust: (n,) bool over all images, True where nothing has fooled it yet.

    Returns:
        Name -> ``(attacked, predicted label, batch)`` over all ``n`` images (on CPU; -1 where
        not run).
    """
    robust = robust.clone()
    n = robust.numel()
    out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for a in plan:
        todo = robust[index]
        idx, xa, ya = index[todo], x[todo.to(x.device)], y[todo.to(y.device)]
        attacked = torch.zeros(n, dtype=torch.bool)
        pred = torch.full((n,), -1, dtype=torch.long)
        batch = torch.full((n,), -1, dtype=torch.long)
        for b, i in enumerate(range(0, len(idx), batch_size)):
            xb, yb = xa[i : i + batch_size].to(device), ya[i : i + batch_size].to(device)
            g = batch_generator(attack_seed(seed, a.name), b, generator_device)
            mask = torch.ones_like(yb, dtype=torch.bool)
            p = _attack_preds(model, a.attack, xb, yb, mask, g, a.params).cpu()
            ids = idx[i : i + batch_size]
            attacked[ids], pred[ids], batch[ids] = True, p, b
            robust[ids] &= p == yb.cpu()
        out[a.name] = (attacked, pred, batch)
    return out


def flag_outcomes(
    flags: dict[str, bool | None],
    plan: tuple[NamedAttack, ...],
    fooled: dict[str, int],
    n: int,
) -> dict[str, str]:
    """Raised flag -> "confirmed" / "refuted" from the images each adaptive attack fooled
    (``fooled``: name -> count, every one robust before it ran)."""
    out = {}
    for flag in (k for k, v in flags.items() if v):
        mine = [a.name for a in plan if flag in TRIGGERS[a.attack]]
        if not mine:
            continue
        count = sum(fooled.get(a, 0) for a in mine)
        out[flag] = "confirmed" if count >= MIN_POINTS and count > 0.01 * n else "refuted"
    return out
