"""Who gets the alias: the promotion rule of the model registry, as a pure function.

A run registers its best retrained model as a new version every time; the alias
(``tracking.alias``, ``champion``) moves to that version only when it earned it:

1. it was evaluated (a failed or skipped evaluation is never promoted, not even by force);
2. its evaluation raised no gradient-masking flag (a flagged robust accuracy may be inflated);
3. it beats the current champion's headline robust accuracy (worst case over the attack suite,
   ``eval_worst_case_acc``) strictly, measured on the same evaluation data (sha256 of the test
   tensors) with the same evaluation protocol (sha256 of the evaluation settings). With no
   current champion, rule 3 holds.

``--force-promote`` overrides rules 2 and 3 (and says so in the reason and the tags). The
evidence is read from, and written to, model-version tags (:data:`TAGS`), so the rule compares
against whatever version holds the alias, from this run or an earlier one. This module imports
neither Ray nor MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.state import EvalOutcome

__all__ = ["TAGS", "Decision", "decide", "evidence_tags"]

# Model-version tags that carry the evaluation evidence.
TAGS = {
    "worst": "rarn.eval_worst_case_acc",
    "clean": "rarn.eval_clean_acc",
    "data": "rarn.eval_data_sha256",
    "protocol": "rarn.eval_protocol",
    "flags": "rarn.masking_flags",
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
        TAGS["worst"]: repr(float(m["eval_worst_case_acc"])),
        TAGS["clean"]: repr(float(m.get("eval_clean_acc", float("nan")))),
        TAGS["data"]: ev.data_sha256,
        TAGS["protocol"]: ev.protocol,
        TAGS["flags"]: ",".join(ev.raised_flags()) or "none",
    }


def _against(ev: EvalOutcome, version: str, tags: Mapping[str, str]) -> Decision:
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
    new, old = float(ev.metrics["eval_worst_case_acc"]), float(tags[TAGS["worst"]])
    scores = f"worst-case robust accuracy {new:.4f} vs {old:.4f}"
    if new > old:
        return Decision(True, f"beats {who}: {scores}")
    return Decision(False, f"does not beat {who}: {scores}")


def decide(
    ev: EvalOutcome | None,
    champion: tuple[str, Mapping[str, str]] | None,
    *,
    force: bool = False,
) -> Decision:
    """Whether the candidate with evaluation ``ev`` takes the alias.

    Args:
        ev: the candidate's evaluation (None: not evaluated).
        champion: ``(version, tags)`` of the version holding the alias now, or None.
        force: ``--force-promote``: overrides the masking and comparison rules.
    """
    if ev is None or ev.error or "eval_worst_case_acc" not in ev.metrics:
        why = f"evaluation failed: {ev.error}" if ev is not None and ev.error else "not evaluated"
        return Decision(False, why)
    flags = ev.raised_flags()
    if flags:
        d = Decision(False, f"evaluation raised gradient-masking flags: {', '.join(flags)}")
    elif champion is None:
        d = Decision(True, "no current champion")
    else:
        d = _against(ev, *champion)
    if force and not d.promote:
        return Decision(True, f"forced by --force-promote ({d.reason})", forced=True)
    return d
