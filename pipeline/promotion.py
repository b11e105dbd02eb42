"""Who gets the alias: the promotion rule of the model registry, as a pure function.

A run registers its best retrained model as a new version every time; the alias
(``tracking.alias``, ``champion``) moves to that version only when it earned it:

1. it was evaluated (a failed or skipped evaluation is never promoted, not even by force);
2. its evaluation raised no gradient-masking flag (a flagged robust accuracy may be inflated);
3. it is significantly more robust than the current champion on the same images: the same
   evaluation data (sha256 of the test tensors), the same evaluation protocol (sha256 of the
   evaluation settings), and the exact one-sided McNemar test on the per-image headline
   (``rarn.robust.evaluation.paired_test``: images robust for one model only) at
   :data:`ALPHA` = 0.05. **Inside the noise** (a higher headline that is not significant, or
   a lower or equal one) the alias stays where it is; so it does when either model lacks the
   per-image evidence (the ``rarn.eval_robust`` mask). With no current champion, rule 3 holds.

``--force-promote`` overrides rules 2 and 3 (and says so in the reason and the tags). The
evidence is read from, and written to, model-version tags (:data:`TAGS`), so the rule compares
against whatever version holds the alias, from this run or an earlier one. This module imports
neither Ray nor MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.state import HEADLINE, EvalOutcome

__all__ = ["ALPHA", "TAGS", "Decision", "candidate_mask", "decide", "evidence_tags"]

ALPHA = 0.05
"""Significance level of the paired test a challenger must pass to take the alias."""

# Model-version tags that carry the evaluation evidence.
TAGS = {
    "worst": f"rarn.{HEADLINE}",
    "clean": "rarn.eval_clean_acc",
    "data": "rarn.eval_data_sha256",
    "protocol": "rarn.eval_protocol",
    "flags": "rarn.masking_flags",
    "robust": "rarn.eval_robust",  # the per-image headline mask (rarn...stats.pack_mask)
}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    forced: bool = False


def evidence_tags(ev: EvalOutcome) -> dict[str, str]:
    """The tags a model version carries about its evaluation."""
    m = ev.metrics
    return {
        TAGS["worst"]: repr(float(m[HEADLINE])),
        TAGS["clean"]: repr(float(m.get("eval_clean_acc", float("nan")))),
        TAGS["data"]: ev.data_sha256,
        TAGS["protocol"]: ev.protocol,
        TAGS["flags"]: ",".join(ev.raised_flags()) or "none",
    } | ({TAGS["robust"]: mask} if (mask := candidate_mask(ev)) else {})


def candidate_mask(ev: EvalOutcome) -> str | None:
    """The packed per-image headline of ``ev`` as the tracking store recorded it (tag
    ``rarn.eval_robust``; None: none recorded). Never read from the run directory."""
    return ev.robust_mask or None


def _against(ev: EvalOutcome, version: str, tags: Mapping[str, str], mine: str | None) -> Decision:
    """Rule 3 against the current champion (its version number and tags)."""
    who = f"champion version {version}"
    if TAGS["worst"] not in tags:
        return Decision(False, f"{who} has no recorded evaluation to compare with")
    theirs = str(tags.get(TAGS["data"]))
    if theirs != ev.data_sha256:
        return Decision(
            False, f"{who} was evaluated on other data (sha256 {theirs[:12]}..., this model's "
            f"{ev.data_sha256[:12]}...)"
        )  # fmt: skip
    if tags.get(TAGS["protocol"]) != ev.protocol:
        return Decision(False, f"{who} was evaluated with other evaluation settings")
    from rarn.robust.evaluation import paired_test, unpack_mask

    new, old = float(ev.metrics[HEADLINE]), float(tags[TAGS["worst"]])
    scores = f"worst-case robust accuracy {new:.4f} vs {old:.4f}"
    theirs_mask = tags.get(TAGS["robust"])
    if mine is None or theirs_mask is None:
        return Decision(False, f"{scores}, but no per-image headline to pair with {who}")
    a, b = unpack_mask(mine), unpack_mask(theirs_mask)
    if a.shape != b.shape:
        return Decision(False, f"{who} was evaluated on {len(b)} images, this model on {len(a)}")
    test = paired_test(a, b)
    if new > old and test.significant(ALPHA):
        return Decision(True, f"beats {who}: {scores}; {test}")
    return Decision(
        False, f"does not beat {who} beyond the noise (alpha {ALPHA}): {scores}; {test}"
    )


def decide(
    ev: EvalOutcome | None,
    champion: tuple[str, Mapping[str, str]] | None,
    *,
    force: bool = False,
    mask: str | None = None,
) -> Decision:
    """Whether the candidate with evaluation ``ev`` takes the alias.

    Args:
        ev: the candidate's evaluation (None: not evaluated).
        champion: ``(version, tags)`` of the version holding the alias now, or None.
        force: ``--force-promote``: overrides the masking and comparison rules.
        mask: the candidate's packed per-image headline (None: :func:`candidate_mask` of ``ev``).
    """
    if ev is None or ev.error or HEADLINE not in ev.metrics:
        why = f"evaluation failed: {ev.error}" if ev is not None and ev.error else "not evaluated"
        return Decision(False, why)
    flags = ev.raised_flags()
    if flags:
        d = Decision(False, f"evaluation raised gradient-masking flags: {', '.join(flags)}")
    elif champion is None:
        d = Decision(True, "no current champion")
    else:
        d = _against(ev, *champion, mask if mask is not None else candidate_mask(ev))
    if force and not d.promote:
        return Decision(True, f"forced by --force-promote ({d.reason})", forced=True)
    return d
