"""The suite's own evidence for the gradient-masking checks of one evaluation.

:func:`~rarn.robust.evaluation.masking_probes.run_masking_checks` attacks a check subset itself; the
suite has already attacked every image, and its per-image results are better evidence: which
images every white-box attack failed on (for the per-image black-box check), FGSM vs PGD and
PGD with few vs many steps over all images (when the suite has them: ``pgd`` and ``pgd100``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rarn.robust.attacks import ATTACK_NORM, attack_spec
from rarn.robust.evaluation._core import _fraction
from rarn.robust.evaluation.masking import (
    MASKING_FLAGS,
    check_fgsm_vs_pgd,
    check_more_steps_stronger,
)
from rarn.robust.evaluation.masking_probes import run_masking_checks
from rarn.robust.evaluation.named import NamedAttack

__all__ = ["masking_flags"]


def masking_flags(
    model: nn.Module,
    s: Any,
    plan: dict[str, NamedAttack],
    tally: Any,
    survived: dict[str, Tensor],
    generator: torch.Generator,
    runs: dict[str, tuple[str, dict[str, Any], Tensor]] | None = None,
) -> dict[str, bool | None]:
    """The masking checks on the first ``check_n`` points, against the suite's white-box evidence.

    ``runs``, when given, is filled with the check attacks at the suite's eps (label ->
    ``(registry key, params, predicted labels on the check subset)``), each drawn from its own
    generator seeded from ``generator``'s seed and its label, for the worst case.

    ``s`` is the :class:`~rarn.robust.evaluation.SuiteSettings`, ``plan`` its resolved entries,
    ``tally`` what the batches added up to (the check subset) and ``survived`` the per-image
    results of the suite's attacks.

    White-box evidence: images that every purely white-box attack of the suite (not AutoAttack,
    whose Square is a black box) ran on and failed on; none such: the checks' own PGD alone.
    Attacks run on a subset smaller than the check's give no evidence on the rest, and entries
    run on the earlier ones' survivors none alone, so both are left out.
    """
    flags: dict[str, bool | None] = dict.fromkeys(MASKING_FLAGS)
    if not (s.checks and s.check_n > 0):
        return flags
    xc, yc = torch.cat(tally.x_check), torch.cat(tally.y_check)
    full = [plan[a] for a in tally.attacks if plan[a].subset(tally.n) >= len(yc)]
    full = [a for a in full if not a.survivors]  # saw only the earlier ones' survivors
    white = [a.name for a in full if _pure_white_box(a.attack)]
    wb = None
    if white:
        wb = torch.stack([survived[a][: len(yc)] for a in white]).all(dim=0)
    main = plan[s.main_attack].params
    flags = run_masking_checks(
        model,
        xc,
        yc,
        eps=main["eps"],
        step_size=main["step_size"],
        steps=main["steps"],
        generator=generator,
        white_box_robust=wb,
        norm=ATTACK_NORM[plan[s.main_attack].attack],
        black_box_queries=s.black_box_queries,
        more_steps_factor=s.more_steps_factor,
        seed=generator.initial_seed(),
        evidence=runs,
    )
    if s.per_attack:  # the whole data: more evidence
        _suite_evidence(flags, [a for a in full if a.subset(tally.n) == tally.n], survived)
    return flags


def _pure_white_box(attack: str) -> bool:
    spec = attack_spec(attack)
    return spec.white_box and not spec.black_box_part


def _suite_evidence(
    flags: dict[str, bool | None], full: list[NamedAttack], survived: dict[str, Tensor]
) -> None:
    """FGSM vs PGD, and PGD with fewer vs more steps, from the suite's own attacks (same eps)."""
    fgsm = [a for a in full if a.attack == "fgsm"]
    pgd = sorted((a for a in full if a.attack == "pgd"), key=lambda a: a.params["steps"])
    acc = {a.name: _fraction(survived[a.name]) for a in full}
    n = len(next(iter(survived.values())))
    for f in fgsm[:1]:
        for p in pgd[:1]:
            if f.params["eps"] == p.params["eps"]:
                hit = check_fgsm_vs_pgd(acc[f.name], acc[p.name], n=n)
                flags["fgsm_beats_pgd"] = bool(flags["fgsm_beats_pgd"]) or hit
    for few, many in zip(pgd, pgd[1:]):
        same = few.params["eps"] == many.params["eps"]
        if same and many.params["steps"] >= 2 * few.params["steps"]:
            hit = check_more_steps_stronger(acc[few.name], acc[many.name], n=n)
            flags["more_steps_stronger"] = bool(flags["more_steps_stronger"]) or hit
