"""The RACL pipeline: Ray Tune search -> Ray Train retraining -> evaluation, tracked in MLflow.

Usage::

    python pipeline/run.py                                  # configs/default.yaml, digits, 2 CPUs
    python pipeline/run.py --config configs/smoke.yaml search.epochs=1 tune.top_k=2
    python pipeline/run.py --config configs/X.yaml --resume # continue an interrupted run_dir
    python -m pipeline.run --smoke --stages search          # tiny everything, search only

With ``RAY_ADDRESS`` set (as under ``ray job submit``) it joins that cluster; otherwise it starts
a local Ray instance whose listeners bind to loopback. Exit codes: 0 done, 1 failed, 2 bad config
or usage (nothing written), 3 tracking server unreachable (nothing written), 130 interrupted
(resume with ``--resume``).

Stage order and bookkeeping live here; every Ray and MLflow call is in the stage modules
(:mod:`pipeline.search`, :mod:`pipeline.retrain`, :mod:`pipeline.evaluate`,
:mod:`pipeline.tracking`). ``<run_dir>/state.json`` records what each stage finished, so
``--resume`` skips finished work: finished trials, retrainings and evaluations are not rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking import TrackingUnavailable, check_reachable, resolve_tracking_uri
from rarn.config import Config, ConfigError, config_to_dict, dump_config, load_config
from rarn.data import DataError, load_dataset

__all__ = ["EXIT", "SMOKE_OVERRIDES", "STAGES", "main", "parse_args", "resolve_config"]

log = logging.getLogger("pipeline")

STAGES = ("search", "retrain", "evaluate")
EXIT = {"ok": 0, "failed": 1, "usage": 2, "tracking": 3, "interrupted": 130}
_ROOT = Path(__file__).resolve().parents[1]

# --smoke: tiny everything (the data set, paths and tracking stay as configured).
SMOKE_OVERRIDES: tuple[str, ...] = (
    "data.limit=200", "data.test_limit=64",
    "search.epochs=2", "search.warmup_epochs=1", "search.batch_size=16",
    "search.max_steps_per_epoch=2", "search.init_channels=8", "search.layers=5",
    "retrain.epochs=1", "retrain.batch_size=32", "retrain.init_channels=8", "retrain.layers=5",
    "retrain.steps=2", "retrain.val_steps=1",
    "evaluation.attacks=[fgsm, pgd]", "evaluation.steps=2", "evaluation.autoattack=false",
    "evaluation.black_box_queries=50",
    "tune.top_k=1", "tune.max_failures=1", "tune.scheduler=none",
)  # fmt: skip


class PipelineError(RuntimeError):
    """A stage could not produce what the next one needs (e.g. every trial errored)."""


# ----------------------------------------------------------------------------------------------
# Command line and config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pipeline/run.py",
        description="RACL search (Ray Tune) -> retraining (Ray Train) -> evaluation, in MLflow.",
        epilog="exit codes: 0 ok, 1 failed, 2 bad config (nothing written), "
        "3 tracking server unreachable, 130 interrupted (rerun with --resume)",
    )
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.epochs=2")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    p.add_argument("--resume", action="store_true", help="continue the run in the config's run_dir")
    p.add_argument("--smoke", action="store_true", help="tiny everything (seconds per stage)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--quiet", action="store_true", help="no Tune tables, no progress lines")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """Config file, then ``--smoke`` shrinking, then the command-line overrides."""
    path = args.config
    if path is None:
        local = Path("configs/default.yaml")
        path = local if local.is_file() else _ROOT / "configs" / "default.yaml"
    overrides = [*(SMOKE_OVERRIDES if args.smoke else ()), *args.overrides]
    cfg = load_config(path, overrides)
    if args.smoke:  # a curve around the config's own eps; a run_dir of its own
        ev = cfg.evaluation
        cfg = dataclasses.replace(
            cfg, evaluation=dataclasses.replace(ev, eps_curve=(ev.eps / 2, ev.eps))
        )
        if not any(o.startswith("run_dir=") for o in args.overrides):
            cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir.rstrip("/") + "-smoke")
    return cfg


def _validate(cfg: Config, stages: Sequence[str], resume: bool) -> None:
    """Everything checkable before anything is written (raises ConfigError)."""
    from pipeline.search import trial_points
    from rarn.data import DATASETS
    from rarn.nas.genotype import get_genotype
    from rarn.robust.attacks import ATTACKS
    from rarn.robust.loop import SCHEDULES
    from rarn.robust.steps import STEPS

    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages: unknown {unknown or 'empty'}; use a subset of {STAGES}")
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name {cfg.data.name!r}: known {', '.join(DATASETS)}")
    trial_points(cfg)
    t = cfg.tune
    checks = [
        (t.scheduler in ("none", "asha"), f"tune.scheduler {t.scheduler!r}: use none | asha"),
        (t.select_mode in ("max", "min"), f"tune.select_mode {t.select_mode!r}: use max | min"),
        (t.top_k >= 1, f"tune.top_k must be >= 1, got {t.top_k}"),
        (t.retrain_workers >= 1, f"tune.retrain_workers must be >= 1, got {t.retrain_workers}"),
        (t.max_failures >= 0, f"tune.max_failures must be >= 0, got {t.max_failures}"),
        (cfg.retrain.method in STEPS, f"retrain.method {cfg.retrain.method!r}: use {list(STEPS)}"),
        (cfg.retrain.schedule in SCHEDULES, f"retrain.schedule {cfg.retrain.schedule!r}"),
        (bool(cfg.evaluation.attacks), "evaluation.attacks must name at least one attack"),
        (cfg.tracking.alias.isidentifier(), f"tracking.alias {cfg.tracking.alias!r} is invalid"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for a in cfg.evaluation.attacks:
        if a not in ATTACKS:
            raise ConfigError(f"evaluation.attacks: unknown attack {a!r}; known {sorted(ATTACKS)}")
    if cfg.retrain.genotype == "searched":
        if "search" not in stages and "retrain" in stages and not resume:
            raise ConfigError("retrain.genotype=searched needs the search stage (or --resume)")
    else:
        try:
            get_genotype(cfg.retrain.genotype)
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"retrain.genotype: {e}") from None


# ----------------------------------------------------------------------------------------------
# Run state (what each stage finished), kept in <run_dir>/state.json


@dataclasses.dataclass
class RunState:
    tracking_uri: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    search: dict[str, Any] = dataclasses.field(default_factory=dict)
    retrain: dict[str, Any] = dataclasses.field(default_factory=dict)  # key -> outcome dict
    evaluate: dict[str, Any] = dataclasses.field(default_factory=dict)  # key -> outcome dict
    registered: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / f".state.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, run_dir / "state.json")

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        return cls(**json.loads((run_dir / "state.json").read_text()))


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class Pipeline:
    """Stage order and bookkeeping for one run directory."""

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
        return self.cfg.tune.storage_path or str(self.run_dir / "ray")

    def data_ref(self) -> Any:
        import ray

        if self.bundle_ref is None:
            self.bundle_ref = ray.put(self.bundle)
        return self.bundle_ref

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
        from rarn.nas.loop import SearchData

        if self.state.search.get("done"):
            self.echo(f"[search] finished earlier: selected {self.state.search['selected']}")
            return
        cfg, t = self.cfg, self.cfg.tune
        data = SearchData.from_bundle(self.bundle, cfg.data.train_portion, cfg.data.seed)
        job = SearchJob(cfg, self.tracking, str(self.run_dir))
        tuner = build_tuner(
            cfg, data, job, storage_path=self.storage_path, resume=self.resume,
            verbose=self.verbose,
        )  # fmt: skip
        n = self._n_trials()
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
        self.state.search = {
            "done": True,
            "selected": selected,
            "outcomes": [o.to_dict() for o in outcomes],
        }
        self.state.save(self.run_dir)
        self.echo(f"[search] selected {selected}")

    def _n_trials(self) -> int:
        from pipeline.search import trial_points

        return len(trial_points(self.cfg))

    # -- stage 2 --------------------------------------------------------------------------------

    def retrain_jobs(self) -> list[Any]:
        from pipeline.retrain import RetrainJob
        from pipeline.search import TrialOutcome
        from rarn.nas.genotype import get_genotype

        common = {"cfg": self.cfg.retrain, "tracking": self.tracking, "run_dir": str(self.run_dir)}
        if self.cfg.retrain.genotype != "searched":
            g = get_genotype(self.cfg.retrain.genotype)
            return [RetrainJob(Path(self.cfg.retrain.genotype).stem, g, **common)]
        if not self.state.search.get("done"):
            raise PipelineError("retrain.genotype=searched, but no search has finished here")
        outcomes = {o["key"]: TrialOutcome.from_dict(o) for o in self.state.search["outcomes"]}
        return [
            RetrainJob(k, outcomes[k].genotype, search_run_id=outcomes[k].search_run_id, **common)
            for k in self.state.search["selected"]
        ]

    def retrain(self) -> None:
        from pipeline.retrain import run_retrain_stage

        jobs = self.retrain_jobs()
        todo = [j for j in jobs if (self.state.retrain.get(j.key) or {}).get("error", "x")]
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
            self.state.retrain[o.key] = o.to_dict()
            self.echo(f"[retrain] {o.key}: " + (f"error: {o.error}" if o.error else "done"))
        self.state.save(self.run_dir)
        if all(o.error for o in outcomes):
            raise PipelineError("every retraining failed; see the errors above")

    # -- stage 3 --------------------------------------------------------------------------------

    def evaluate(self) -> None:
        from pipeline.evaluate import run_evaluate_stage
        from pipeline.retrain import RetrainOutcome

        done = [RetrainOutcome(**o) for o in self.state.retrain.values() if not o.get("error")]
        todo = [r for r in done if (self.state.evaluate.get(r.key) or {}).get("error", "x")]
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
                self.state.evaluate[o.key] = o.to_dict()
                if o.error:
                    self.echo(f"[evaluate] {o.key}: error: {o.error}")
            self.state.save(self.run_dir)

    # -- registry and summary ---------------------------------------------------------------------

    def register(self) -> None:
        from pipeline.tracking import register_champion

        if self.state.registered:
            return

        def score(o: dict[str, Any]) -> tuple[float, float]:
            ev = (self.state.evaluate.get(o["key"]) or {}).get("metrics") or {}
            if ev:
                return (ev["eval_worst_case_acc"], ev["eval_clean_acc"])
            m = o["metrics"]
            return (m.get("final_val_robust_acc", 0.0), m.get("final_val_acc", 0.0))

        ok = [o for o in self.state.retrain.values() if not o.get("error") and o.get("model_uri")]
        if not ok:
            return
        best = max(ok, key=score)
        tc = self.cfg.tracking
        tags = {
            "rarn.parent_run_id": self.tracking.parent_run_id,
            "rarn.search_run_id": best["search_run_id"],
            "rarn.retrain_run_id": best["retrain_run_id"],
            "rarn.genotype_sha": best["genotype_sha"],
            "rarn.model_sha256": best["model_sha256"],
            "rarn.trial_key": best["key"],
            "rarn.data_fingerprint": self.bundle.fingerprint if self.bundle is not None else "",
        }
        name, uri = tc.registered_model, best["model_uri"]
        version = register_champion(self.tracking, name, tc.alias, uri, tags)
        self.state.registered = {
            "name": tc.registered_model,
            "alias": tc.alias,
            "version": version,
            "uri": f"models:/{tc.registered_model}@{tc.alias}",
            "key": best["key"],
        }
        self.state.save(self.run_dir)
        self.tracking.client().set_tag(
            self.tracking.parent_run_id, "rarn.champion", f"{tc.registered_model}/{version}"
        )

    def summary(self) -> str:
        from pipeline.tracking import redact_uri

        rows = [("rank", "trial", "overrides", "genotype", "clean", "robust", "pgd", "log-Lip",
                 "search run", "retrain run")]  # fmt: skip
        outcomes = {o["key"]: o for o in self.state.search.get("outcomes", [])}
        retrained = sorted(
            self.state.retrain.values(),
            key=lambda o: (
                -((self.state.evaluate.get(o["key"]) or {}).get("metrics") or {}).get(
                    "eval_worst_case_acc", -1.0
                )
            ),
        )
        for i, o in enumerate(retrained, 1):
            ev = (self.state.evaluate.get(o["key"]) or {}).get("metrics") or {}
            over = (outcomes.get(o["key"]) or {}).get("overrides", {})
            rows.append((
                str(i), o["key"], ",".join(f"{k}={v}" for k, v in over.items()) or "-",
                o["genotype_sha"][:12], _fmt(ev.get("eval_clean_acc")),
                _fmt(ev.get("eval_worst_case_acc")), _fmt(ev.get("eval_pgd_acc")),
                _fmt(o["metrics"].get("final_log_lipschitz_upper"), 2),
                o["search_run_id"] or "-", o.get("retrain_run_id") or "-",
            ))  # fmt: skip
        if not retrained:  # --stages search: the selected trials
            for i, key in enumerate(self.state.search.get("selected", []), 1):
                o = outcomes[key]
                rows.append((
                    str(i), key, ",".join(f"{k}={v}" for k, v in o["overrides"].items()) or "-",
                    (o["genotype_sha"] or "")[:12], "-", "-", "-", "-",
                    o["search_run_id"] or "-", "-",
                ))  # fmt: skip
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        errored = [o for o in outcomes.values() if o.get("error")]
        lines += [f"errored trial {o['key']} {o['overrides']}: {o['error']}" for o in errored]
        lines += [f"failed retraining {o['key']}: {o['error']}"
                  for o in self.state.retrain.values() if o.get("error")]  # fmt: skip
        reg = self.state.registered
        lines.append(f"parent run:       {self.tracking.parent_run_id} (experiment "
                     f"{self.cfg.tracking.experiment})")  # fmt: skip
        if reg:
            version = f"version {reg['version']}, trial {reg['key']}"
            lines.append(f"registered model: {reg['uri']} ({version})")
        uri = self.tracking.uri
        ui = f"mlflow ui --backend-store-uri {redact_uri(uri)}" if uri.startswith("sqlite") else uri
        lines.append(f"MLflow UI:        {ui}")
        lines.append(f"run directory:    {self.run_dir}")
        return "\n".join(lines)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# Entry point


def _ray_env_defaults(connect: bool) -> None:
    """Quiet, loopback-only defaults (ENV.md §4); must run before ``import ray``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if not connect:  # our own instance: node IP 127.0.0.1, no token auth on loopback
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _init_ray(args: argparse.Namespace) -> bool:
    """Join ``$RAY_ADDRESS`` or start a local instance; returns True when we started one."""
    import ray

    if ray.is_initialized():  # e.g. the test suite's shared instance
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=not args.quiet)
        return True
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; returns the exit code (see the module docstring)."""
    args = parse_args(argv)
    echo = (lambda _: None) if args.quiet else (lambda s: print(s, flush=True))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    # -- checks that write nothing: config, data, tracking server --------------------------------
    try:
        cfg = resolve_config(args)
        _validate(cfg, stages, args.resume)
        run_dir = Path(cfg.run_dir).resolve()
        if args.resume and not (run_dir / "state.json").is_file():
            raise ConfigError(f"--resume: no run to resume in {run_dir}")
        if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"run_dir {run_dir} holds a previous run: pass --resume to continue it, or "
                "run_dir=<new folder> to start another"
            )
        if args.resume:
            stored = load_config(run_dir / "config.yaml")
            diff = _diff(config_to_dict(stored), config_to_dict(cfg))
            if diff:
                raise ConfigError(f"--resume: config differs from {run_dir}/config.yaml: {diff}")
        uri = resolve_tracking_uri(cfg.tracking)
        check_reachable(uri)  # seconds, not MLflow's minutes of retries
        bundle = load_dataset(cfg.data)
    except TrackingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT["tracking"]
    except (ConfigError, DataError, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return EXIT["usage"]
    # -- from here on, things are written ----------------------------------------------------------
    _ray_env_defaults(connect=bool(os.environ.get("RAY_ADDRESS")))
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState.load(run_dir) if args.resume else RunState(tracking_uri=uri)
    if not args.resume:
        dump_config(cfg, run_dir / "config.yaml")
        state.save(run_dir)
    started = _init_ray(args)
    pipe = None
    try:
        from pipeline.tracking import prepare_tracking

        tracking = prepare_tracking(
            cfg, uri=state.tracking_uri or uri, run_dir=run_dir, fingerprint=bundle.fingerprint,
            parent_run_id=state.parent_run_id or None,
        )  # fmt: skip
        state.experiment_id, state.parent_run_id = tracking.experiment_id, tracking.parent_run_id
        state.save(run_dir)
        pipe = Pipeline(cfg, run_dir, state, tracking, args.resume, echo, 0 if args.quiet else 1,
                        bundle=bundle)  # fmt: skip
        t0 = time.monotonic()
        for stage in STAGES:
            if stage in stages:
                getattr(pipe, stage)()
        if "retrain" in stages or "evaluate" in stages:
            pipe.register()
        tracking.client().set_terminated(tracking.parent_run_id, "FINISHED")
        echo(f"\n[done] {time.monotonic() - t0:.0f} s\n" + pipe.summary())
        return EXIT["ok"]
    except KeyboardInterrupt:
        _close(pipe, "KILLED")
        given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        resume = shlex.join(["python", "pipeline/run.py", *given, "--resume"])
        print(f"\ninterrupted; continue with: {resume}", file=sys.stderr)
        return EXIT["interrupted"]
    except PipelineError as e:
        _close(pipe, "FAILED")
        print(f"error: {e}", file=sys.stderr)
        return EXIT["failed"]
    except BaseException:
        _close(pipe, "FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()


def _close(pipe: Pipeline | None, status: str) -> None:
    """End the parent and any child left RUNNING (KILLED on interrupt, FAILED on error)."""
    if pipe is None:
        return
    from pipeline.tracking import close_open_children

    try:
        close_open_children(pipe.tracking, status)
        pipe.tracking.client().set_terminated(pipe.tracking.parent_run_id, status)
    except Exception:  # never mask the original error
        log.exception("could not close the MLflow runs")


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) and k != "param_space":
            keys += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


if __name__ == "__main__":
    sys.exit(main())
