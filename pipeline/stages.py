"""The driver side of each stage: what it takes from the run state, what it records there.

:class:`Pipeline` runs one stage per method, skipping what ``state.json`` says is finished, and
saves the state after each. The Ray Tune, Ray Train and MLflow work itself is in
:mod:`pipeline.search`, :mod:`pipeline.retrain`, :mod:`pipeline.evaluate` and
:mod:`pipeline.tracking` / :mod:`pipeline.model_store`; here the data set goes into Ray's
object store once (``ray.put``) and the champion is registered. Those modules are imported
inside the methods, so importing this one imports neither Ray nor MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.state import Registration, RunState, SearchState
from rarn.config import Config

__all__ = ["Pipeline", "PipelineError"]


class PipelineError(RuntimeError):
    """A stage could not produce what the next one needs (e.g. every trial errored)."""


@dataclass
class Pipeline:
    """Stage bookkeeping for one run directory."""

    cfg: Config
    run_dir: Path
    state: RunState
    tracking: Any  # pipeline.tracking.Tracking
    resume: bool
    echo: Callable[[str], None]
    verbose: int
    bundle: Any = None  # rarn.data.DatasetBundle
    bundle_ref: Any = None

    @property
    def storage_path(self) -> str:
        from pipeline.storage import run_storage_path

        return run_storage_path(self.cfg, self.run_dir)

    def data_ref(self) -> Any:
        import ray

        if self.bundle_ref is None:
            self.bundle_ref = ray.put(self.bundle)
        return self.bundle_ref

    def _save(self) -> None:
        self.state.save(self.run_dir)

    # -- stage 1 --------------------------------------------------------------------------------

    def search(self) -> None:
        from pipeline.search import (
            SearchJob,
            build_tuner,
            collect_outcomes,
            fit,
            load_genotypes,
            select_top_k,
        )
        from pipeline.trials import trial_points
        from rarn.nas.loop import SearchData

        if self.state.search is not None:
            self.echo(f"[search] finished earlier: selected {self.state.search.selected}")
            return
        cfg, t = self.cfg, self.cfg.tune
        data = SearchData.from_bundle(self.bundle, cfg.data.train_portion, cfg.data.seed)
        job = SearchJob(cfg, self.tracking, str(self.run_dir))
        tuner = build_tuner(
            cfg, data, job, storage_path=self.storage_path, resume=self.resume,
            verbose=self.verbose,
        )  # fmt: skip
        n = len(trial_points(cfg))
        self.echo(f"[search] Ray Tune: {n} trials, top {t.top_k} by {t.select_metric}")
        results, interrupted = fit(tuner)
        if interrupted:  # Tune stopped on SIGINT and saved its state for Tuner.restore
            raise KeyboardInterrupt
        outcomes = collect_outcomes(results, cfg, self.tracking)
        selected = select_top_k(outcomes, t.top_k, t.select_metric, t.select_mode)
        for o in outcomes:
            if o.error:
                self.echo(f"[search] trial {o.key} {o.overrides} errored: {o.error}")
        if not selected:
            raise PipelineError("no search trial finished; see the errors above")
        with tempfile.TemporaryDirectory() as d:
            load_genotypes(outcomes, selected, self.tracking, Path(d))
        self.state.search = SearchState(selected, outcomes)
        self._save()
        self.echo(f"[search] selected {selected}")

    # -- stage 2 --------------------------------------------------------------------------------

    def retrain_jobs(self) -> list[Any]:
        """One :class:`pipeline.retrain.RetrainJob` per selected trial (or bundled genotype)."""
        from pipeline.retrain import RetrainJob
        from rarn.nas.genotype import get_genotype

        common = {"cfg": self.cfg.retrain, "tracking": self.tracking, "run_dir": str(self.run_dir)}
        if self.cfg.retrain.genotype != "searched":
            g = get_genotype(self.cfg.retrain.genotype)
            return [RetrainJob(Path(self.cfg.retrain.genotype).stem, g, **common)]
        search = self.state.search
        if search is None:
            raise PipelineError("retrain.genotype=searched, but no search has finished here")
        jobs = []
        for key in search.selected:
            o = search.outcome(key)
            jobs.append(RetrainJob(key, o.genotype, search_run_id=o.search_run_id, **common))
        return jobs

    def retrain(self) -> None:
        from pipeline.retrain import run_retrain_stage

        jobs = self.retrain_jobs()
        todo = [j for j in jobs if not self.state.retrain_done(j.key)]
        if not todo:
            self.echo(f"[retrain] finished earlier: {[j.key for j in jobs]}")
            return
        t = self.cfg.tune
        self.echo(
            f"[retrain] Ray Train: {len(todo)} genotype(s) x {t.retrain_workers} worker(s) "
            f"({'NCCL/GPU' if t.retrain_use_gpu else 'gloo/CPU'}), {self.cfg.retrain.epochs} epochs"
        )
        outcomes = run_retrain_stage(
            todo, self.data_ref(), t, storage_path=self.storage_path,
            echo=self.echo if self.verbose else (lambda _: None),
        )  # fmt: skip
        for o in outcomes:
            self.state.retrain[o.key] = o
            self.echo(f"[retrain] {o.key}: " + (f"error: {o.error}" if o.error else "done"))
        self._save()
        if all(o.error for o in outcomes):
            raise PipelineError("every retraining failed; see the errors above")

    # -- stage 3 --------------------------------------------------------------------------------

    def evaluate(self) -> None:
        from pipeline.evaluate import run_evaluate_stage

        done = self.state.retrained()
        todo = [r for r in done if not self.state.evaluate_done(r.key)]
        if not done:
            raise PipelineError("nothing to evaluate: no finished retraining in this run_dir")
        if todo:
            ev = self.cfg.evaluation
            self.echo(f"[evaluate] {len(todo)} model(s): {', '.join(ev.attacks)} at eps {ev.eps:g}")
            outcomes = run_evaluate_stage(
                todo, self.tracking, self.data_ref(), ev, self.cfg.tune,
                out_dir=self.run_dir / "evaluation",
            )  # fmt: skip
            for o in outcomes:
                self.state.evaluate[o.key] = o
                if o.error:
                    self.echo(f"[evaluate] {o.key}: error: {o.error}")
            self._save()

    # -- registry -------------------------------------------------------------------------------

    def register(self) -> None:
        """Register the best retrained model as ``tracking.registered_model@tracking.alias``."""
        from pipeline.model_store import register_champion

        if self.state.registered is not None:
            return
        best = self.state.champion()
        if best is None:
            return
        tc = self.cfg.tracking
        tags = {
            "rarn.parent_run_id": self.tracking.parent_run_id,
            "rarn.search_run_id": best.search_run_id,
            "rarn.retrain_run_id": best.retrain_run_id,
            "rarn.genotype_sha": best.genotype_sha,
            "rarn.model_sha256": best.model_sha256,
            "rarn.trial_key": best.key,
            "rarn.data_fingerprint": self.bundle.fingerprint if self.bundle is not None else "",
        }
        version = register_champion(self.tracking, tc.registered_model, tc.alias, best.model_uri,
                                    tags)  # fmt: skip
        uri = f"models:/{tc.registered_model}@{tc.alias}"
        self.state.registered = Registration(tc.registered_model, tc.alias, version, uri, best.key)
        self._save()
        self.tracking.client().set_tag(
            self.tracking.parent_run_id, "rarn.champion", f"{tc.registered_model}/{version}"
        )
