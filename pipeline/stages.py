"""The driver side of each stage: what it takes from the run state, what it records there.

:class:`Pipeline` runs one stage per method, skipping what ``state.json`` says is finished, and
saves the state after each. The Ray Tune, Ray Train and MLflow work itself is in
:mod:`pipeline.search`, :mod:`pipeline.retrain`, :mod:`pipeline.evaluate`,
:mod:`pipeline.transfer`, :mod:`pipeline.registration` and :mod:`pipeline.tracking` /
:mod:`pipeline.model_store`; here the data set goes into Ray's object store once (``ray.put``).
Those modules are imported inside the methods, so importing this one imports neither Ray nor
MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.state import EvalOutcome, RunState, SearchState
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
    force_promote: bool = False  # --force-promote (pipeline.promotion)

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

    def _restore_recorded_tune(self) -> None:
        """Before ``Tuner.restore``: a Tune file saved after its last record (the driver was
        killed in between) is replaced by the kept copy of the version the tracking store
        recorded (:func:`pipeline.tune_state.verify_storage`; pre-flight refused anything else)."""
        from pipeline.tune_state import SNAPSHOTS, store_digests, verify_storage

        recorded = store_digests(self.tracking.uri, self.state.parent_run_id)
        verify_storage(self.storage_path, recorded, "the tracking store",
                       snapshots=self.run_dir / SNAPSHOTS, restore=True)  # fmt: skip

    def _record_tune(self, digests: dict[str, str]) -> None:
        """Record the sha256 of Ray Tune's files as Tune writes them, in the tracking store (the
        parent run's tags) and in ``state.json`` (see :mod:`pipeline.tune_state`): ``--resume``
        restores only from ones the tracking store recorded."""
        from mlflow.entities import RunTag

        from pipeline.tune_state import digest_tags, merge_digests

        if digests:
            self.state.tune_files = merge_digests(self.state.tune_files, digests)
            tags = digest_tags(self.state.tune_files, digests)  # the store first: it counts
            items = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, len(items), 100):  # log_batch takes at most 100 tags per call
                self.tracking.client().log_batch(
                    self.tracking.parent_run_id, tags=items[i : i + 100]
                )
            self._save()

    def search(self) -> None:
        from pipeline.console import attach, classic_output, progress_reporter, trial_lines
        from pipeline.search import (
            SearchJob,
            build_tuner,
            collect_outcomes,
            experiment_name,
            fit,
            load_genotypes,
            select_top_k,
        )
        from pipeline.trials import trial_points
        from pipeline.tune_state import SNAPSHOTS, digest_recorder, storage_digests
        from rarn.nas.loop import SearchData

        if self.state.search is not None:
            self.echo(f"[search] finished earlier: selected {self.state.search.selected}")
            return
        cfg, t = self.cfg, self.cfg.tune
        data = SearchData.from_bundle(self.bundle, cfg.data.train_portion, cfg.data.seed)
        job = SearchJob(cfg, self.tracking, str(self.run_dir))
        if self.resume:  # a version saved after the last record: back to the recorded one
            self._restore_recorded_tune()
        tuner = build_tuner(
            cfg, data, job, storage_path=self.storage_path, resume=self.resume,
            verbose=self.verbose,
        )  # fmt: skip
        experiment = experiment_name(job)  # Tune's folder under storage
        self._record_tune(storage_digests(self.storage_path, experiment))  # tuner.pkl, just written
        attach(tuner, level=self.verbose, reporter=progress_reporter(t.select_metric, self.verbose),
               callbacks=[digest_recorder(self._record_tune, self.run_dir / SNAPSHOTS),
                          trial_lines(self.echo)])  # fmt: skip
        n = len(trial_points(cfg))
        chosen = "all (study)" if cfg.study.variants else f"top {t.top_k}"
        self.echo(f"[search] Ray Tune: {n} trials, {chosen} by {t.select_metric}")
        self.tracking.client().set_tag(
            self.tracking.parent_run_id,
            "rarn.select_metric",
            f"{t.select_metric} ({t.select_mode})",
        )
        with classic_output(self.verbose):
            results, interrupted = fit(tuner)
        self._record_tune(storage_digests(self.storage_path, experiment))  # Tune's final save
        if interrupted:  # Tune stopped on SIGINT and saved its state for Tuner.restore
            raise KeyboardInterrupt
        outcomes = collect_outcomes(results, cfg, self.tracking)
        k = len(outcomes) if cfg.study.variants else t.top_k  # a study retrains every genotype
        selected = select_top_k(outcomes, k, t.select_metric, t.select_mode)
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
        """One :class:`pipeline.retrain.RetrainJob` per selected trial (or configured genotype or
        named network), then one per reference network."""
        from pipeline.retrain import RetrainJob
        from rarn.models.baselines import BASELINES
        from rarn.space.genotype import get_genotype

        common = {"cfg": self.cfg.retrain, "tracking": self.tracking, "run_dir": str(self.run_dir)}
        references = [RetrainJob.of(n, a, **common) for n, a in self.baselines().items()]
        name = self.cfg.retrain.genotype
        if name != "searched":
            arch = name if name in BASELINES else get_genotype(name)
            return [RetrainJob.of(Path(name).stem, arch, **common), *references]
        search = self.state.search
        if search is None:
            raise PipelineError("retrain.genotype=searched, but no search has finished here")
        jobs = []
        for key in search.selected:
            o = search.outcome(key)
            run_id = self._checked_genotype(key, o)
            jobs.append(RetrainJob(key, o.genotype, search_run_id=run_id, **common))
        return [*jobs, *references]

    def _checked_genotype(self, key: str, o: Any) -> str:
        """The search run of trial ``key`` (found in the tracking store, not taken from
        ``state.json``), after checking that ``state.json``'s genotype is the one it recorded.

        Raises:
            PipelineError: no such trial run, or another genotype (``state.json`` edited).
        """
        run_id = self.tracking.find_child("search", key)
        recorded = None
        if run_id is not None:
            recorded = self.tracking.client().get_run(run_id).data.tags.get("rarn.genotype_sha")
        if o is None or o.genotype is None or recorded != o.genotype.sha256():
            raise PipelineError(
                f"state.json's genotype of trial {key} is not the one its search run recorded in "
                "the tracking store (edited by hand?); refused. Restore state.json, or start a "
                "new run"
            )
        return run_id

    def baselines(self) -> dict[str, Any]:
        """The reference networks retrained beside the searched ones (``retrain.baselines``, and
        ``random-<seed>`` per study seed), by key: a genotype, or the name of a network of
        :data:`rarn.models.baselines.BASELINES`. They are ranked, never registered."""
        from pipeline.state import BASELINE_PREFIX
        from rarn.config.variants import RANDOM_PREFIX, random_seed_of
        from rarn.models.baselines import BASELINES
        from rarn.space.genotype import get_genotype, random_genotype

        names = list(self.cfg.retrain.baselines)
        if self.cfg.study.variants and self.cfg.study.random_baseline:
            names += [f"{RANDOM_PREFIX}{s}" for s in self.cfg.study.seeds if s not in names]
        out: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            seed = random_seed_of(name)
            if name in BASELINES:
                out[BASELINE_PREFIX + name] = name
            elif seed is None:
                out[BASELINE_PREFIX + name] = get_genotype(name)
            else:
                out[BASELINE_PREFIX + name] = random_genotype(seed, self.cfg.search.nodes)
        return out

    def retrain(self) -> None:
        from pipeline.retrain import run_retrain_stage

        jobs = self.retrain_jobs()
        todo = [j for j in jobs if not self.state.retrain_done(j.key)]
        if not todo:
            self.echo(f"[retrain] finished earlier: {[j.key for j in jobs]}")
            return
        t = self.cfg.tune
        gpu = t.retrain_use_gpu
        how = (
            f"Ray Train: {len(todo)} genotype(s) x {t.retrain_workers} worker(s) "
            f"({'NCCL/GPU' if gpu else 'gloo/CPU'})"
            if t.retrain_workers > 1
            else f"{len(todo)} genotype(s), one Ray task each ({'GPU' if gpu else 'CPU'})"
        )
        self.echo(f"[retrain] {how}, {self.cfg.retrain.epochs} epochs")
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
        """Evaluate every retrained model not evaluated yet.

        Raises:
            PipelineError: an evaluation failed or was skipped (after the state is saved, so
                ``--resume`` evaluates only those again); nothing is registered then.
        """
        from pipeline.evaluate import run_evaluate_stage
        from pipeline.evidence import store_retrained
        from rarn.robust.evaluation import SuiteSettings

        done = self.state.retrained()
        todo = [r for r in done if not self.state.evaluate_done(r.key)]
        if not done:
            raise PipelineError("nothing to evaluate: no finished retraining in this run_dir")
        if todo:  # the models, runs and digests the tracking store recorded, not state.json's
            stored, notes = store_retrained(self.state, self.tracking)
            for note in notes:
                self.echo(f"[evaluate] refused: {note}")
            by_key = {r.key: r for r in stored}
            for r in todo:
                if r.key not in by_key:
                    self.state.evaluate[r.key] = EvalOutcome(
                        r.key, error="the tracking store has no finished retraining with a model"
                    )
            todo = [by_key[r.key] for r in todo if r.key in by_key]
        if todo:
            ev = self.cfg.evaluation
            names = ", ".join(a.name for a in SuiteSettings.from_config(ev).attacks)
            self.echo(f"[evaluate] {len(todo)} model(s): {names} at eps {ev.eps:g}")
            outcomes = run_evaluate_stage(
                todo, self.tracking, self.data_ref(), ev, self.cfg.tune,
                out_dir=self.run_dir / "evaluation",
            )  # fmt: skip
            for o in outcomes:
                self.state.evaluate[o.key] = o
                if o.error:
                    self.echo(f"[evaluate] {o.key}: error: {o.error}")
            self._save()
        failed = [r.key for r in done if not self.state.evaluate_done(r.key)]
        if failed:
            raise PipelineError(
                f"evaluation failed for {', '.join(failed)} (see above): nothing is registered "
                "or promoted; fix the cause and rerun with --resume"
            )
        if self.cfg.evaluation.transfer:
            self.transfer()

    def transfer(self) -> None:
        """The transfer matrix of every evaluated model (``evaluation.transfer``), once two or
        more are; redone only when the evaluated models change.

        Its failure is reported and recorded (``--resume`` tries again), not raised: the
        evaluations are saved already, and an optional artifact does not block the registry.
        """
        from pipeline.evidence import store_retrained
        from pipeline.transfer import run_transfer_stage, transfer_attack

        ev = self.cfg.evaluation
        done = {r.key for r in self.state.retrained() if self.state.evaluate_done(r.key)}
        if len(done) < 2:
            return
        stored, notes = store_retrained(self.state, self.tracking)  # the store's models, not
        for note in notes:  # state.json's
            self.echo(f"[transfer] refused: {note}")
        models = [r for r in stored if r.key in done and r.model_uri]
        keys = [r.key for r in models]
        if len(models) < 2:
            return
        if self.state.transfer_done(keys):
            self.echo(f"[transfer] finished earlier: {self.state.transfer.path}")
            return
        p, n = transfer_attack(ev), ev.transfer_n or "all"
        self.echo(f"[transfer] {len(keys)} x {len(keys)} models: PGD-{p['steps']} at eps "
                  f"{p['eps']:g} on {n} test images")  # fmt: skip
        outcome = run_transfer_stage(
            models, self.tracking, self.data_ref(), ev, self.cfg.tune,
            out_dir=self.run_dir / "evaluation",
        )  # fmt: skip
        self.state.transfer = outcome
        self._save()
        if outcome.error:
            self.echo(f"[transfer] error: {outcome.error} (the evaluations are kept; --resume "
                      "tries again)")  # fmt: skip
        else:
            self.echo(f"[transfer] {outcome.path}, {outcome.png}")

    # -- study mode -----------------------------------------------------------------------------

    def study(self) -> None:
        """Study mode: the per-variant table (mean ± std over seeds) of every evaluated model,
        written to ``<run_dir>/study/`` and the parent run's ``study/`` artifacts."""
        from pipeline.study import write_study

        text = write_study(self.cfg, self.state, self.run_dir, self.tracking, self.bundle)
        self.echo(f"[study] {self.run_dir / 'study'} (mean ± std over seeds)\n{text}")

    # -- registry -------------------------------------------------------------------------------

    def register(self) -> None:
        """Register the run's best model, promoted only if it earned it
        (:func:`pipeline.registration.register_champion`)."""
        from pipeline.registration import register_champion

        register_champion(self)
