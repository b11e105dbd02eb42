"""The registry stage: the run's best model becomes a new version of
``tracking.registered_model``; the alias moves to it only if :func:`pipeline.promotion.decide`
agrees. Called by :meth:`pipeline.stages.Pipeline.register`; MLflow is imported inside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.state import Registration

if TYPE_CHECKING:
    from pipeline.stages import Pipeline

__all__ = ["register_champion"]


def register_champion(p: Pipeline) -> None:
    """Register the run's best model as a new version of ``tracking.registered_model``; the
    alias ``tracking.alias`` moves to it only if :func:`pipeline.promotion.decide` agrees.

    On ``--resume`` a version registered earlier is reused (and promoted if it now earned
    it, e.g. once its evaluation finished); a promoted one is left alone.

    The candidate, its model and its evaluation are read from the tracking store
    (:func:`pipeline.evidence.store_state`), never from ``state.json`` alone; a reused
    version must carry the candidate's lineage tags in the registry.
    """
    from pipeline.evidence import store_state, version_matches
    from pipeline.model_store import current_alias_version, register_version, set_alias
    from pipeline.promotion import decide, evidence_tags

    reg = p.state.registered
    if reg is not None and reg.promoted:
        return
    trusted, notes = store_state(p.state, p.tracking)
    for note in notes:
        p.echo(f"[registry] refused: {note}")
    p.state.retrain.update(trusted.retrain)  # the cache corrected from the store
    p.state.evaluate.update(trusted.evaluate)
    best = trusted.champion()
    if best is None:
        return
    tc, client = p.cfg.tracking, p.tracking.client()
    ev = trusted.evaluate.get(best.key)
    current = current_alias_version(p.tracking, tc.registered_model, tc.alias)
    champion = None if current is None else (str(current.version), current.tags)
    decision = decide(ev, champion, force=p.force_promote)
    version = None
    if reg is not None and reg.key == best.key:
        mv = _model_version(client, tc.registered_model, reg.version)
        if mv is not None and version_matches(mv, best):
            version = reg.version
        else:
            p.echo(
                f"[registry] refused: state.json names version {reg.version!r} of "
                f"{tc.registered_model}, which does not hold {best.key}'s model"
            )
    if version is None:
        version = register_version(p.tracking, tc.registered_model, best.model_uri,
                                   _lineage(p, best))  # fmt: skip
    verdict = ("promoted: " if decision.promote else "not promoted: ") + decision.reason
    tags = {"rarn.promotion": verdict, "rarn.force_promote": str(p.force_promote).lower()}
    if ev is not None and ev.metrics and not ev.error:
        tags |= evidence_tags(ev)
    for k, v in tags.items():
        client.set_model_version_tag(tc.registered_model, version, k, v)
    if decision.promote:
        set_alias(p.tracking, tc.registered_model, tc.alias, version)
    name = tc.registered_model
    uri = f"models:/{name}" + (f"@{tc.alias}" if decision.promote else f"/{version}")
    p.state.registered = Registration(
        name, tc.alias, version, uri, best.key, decision.promote, decision.reason
    )
    p.state.save(p.run_dir)
    parent = p.tracking.parent_run_id
    client.set_tag(parent, "rarn.registered", f"{tc.registered_model}/{version}")
    client.set_tag(parent, "rarn.force_promote", str(p.force_promote).lower())
    if decision.promote:
        client.set_tag(parent, "rarn.champion", f"{tc.registered_model}/{version}")
    p.echo(f"[registry] {tc.registered_model} version {version} {verdict}")


def _lineage(p: Pipeline, best: Any) -> dict[str, str]:
    """Tags of a new model version: where it came from."""
    return {
        "rarn.parent_run_id": p.tracking.parent_run_id,
        "rarn.search_run_id": best.search_run_id,
        "rarn.retrain_run_id": best.retrain_run_id,
        "rarn.genotype_sha": best.genotype_sha,
        "rarn.model_sha256": best.model_sha256,
        "rarn.trial_key": best.key,
        "rarn.data_fingerprint": p.bundle.fingerprint if p.bundle is not None else "",
    }


def _model_version(client: Any, name: str, version: str) -> Any | None:
    """The registry's model version, or None when it does not exist (or is not a version)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        return None
