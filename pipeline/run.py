"""The RACL pipeline: Ray Tune search -> Ray Train retraining -> evaluation, tracked in MLflow.

Usage::

    python pipeline/run.py                                  # configs/default.yaml, digits, 2 CPUs
    python pipeline/run.py --config configs/smoke.yaml search.epochs=1 tune.top_k=2
    python pipeline/run.py --config configs/X.yaml --resume # continue an interrupted run_dir
    python -m pipeline.run --smoke --stages search          # configs/smoke.yaml, search only

With ``RAY_ADDRESS`` set (as under ``ray job submit``) it joins that cluster; otherwise it starts
a local Ray instance whose listeners bind to loopback. Exit codes: 0 done, 1 failed (also a failed
or skipped evaluation: nothing is promoted then; a full disk, read-only file system or denied
permission, named with its path), 2 bad config or usage, run_dir in use, unusable or not
resumable (a file ``--resume`` would load that the tracking store did not record, a path that
leaves its folder), a ``$RAY_ADDRESS`` that does not answer, a cluster too small or (multi-node)
unsafe storage/tracking (nothing written), 3 tracking server unreachable, failing or refusing the
credentials (nothing written when found before the run; one line when it fails during it), 130
interrupted by SIGINT or SIGTERM (resume with ``--resume``; never advised for a run that wrote
nothing). The run directory is untrusted input: see docs/registry.md, "Trust model".

This module is the command line and the stage order. It applies the Ray/MLflow environment
defaults (:mod:`pipeline.env`) before anything imports Ray, runs the checks that write nothing
(:mod:`pipeline.preflight`, :mod:`pipeline.tracking_uri`), takes the run directory's lock
(:mod:`pipeline.runlock`) for the whole run, starts or joins Ray (``ray.init``,
``ray.shutdown``), checks the cluster (:mod:`pipeline.cluster`: resources; tracking and storage
every node sees), and runs the stages of :class:`pipeline.stages.Pipeline` in order; the MLflow
parent run is created and ended through :mod:`pipeline.tracking`. ``<run_dir>/state.json``
(:mod:`pipeline.state`) records what each stage finished, so ``--resume`` skips finished work:
finished trials, retrainings and evaluations are not rerun. The closing summary is
:mod:`pipeline.report`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.env import apply_env_defaults
from pipeline.order import STAGE_TABLE, selectable
from pipeline.tracking_uri import redact_uri
from rarn.config import Config, ConfigError, load_config

__all__ = ["EXIT", "STAGES", "main", "parse_args", "resolve_config"]

log = logging.getLogger("pipeline")

STAGES = selectable()  # the --stages choices (pipeline.order's table)
EXIT = {"ok": 0, "failed": 1, "usage": 2, "tracking": 3, "interrupted": 130}
_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pipeline/run.py",
        description="RACL search (Ray Tune) -> retraining (Ray Train) -> evaluation, in MLflow.",
        epilog="exit codes: 0 ok, 1 failed (incl. a failed evaluation, disk full, read-only, "
        "permission denied), 2 bad config, run_dir, RAY_ADDRESS or cluster (nothing written), "
        "3 tracking server unreachable, failing or refusing credentials, 130 interrupted "
        "(SIGINT or SIGTERM; rerun with --resume)",
    )
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.epochs=2")
    p.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    p.add_argument("--resume", action="store_true", help="continue the run in the config's run_dir")
    p.add_argument("--smoke", action="store_true", help="use configs/smoke.yaml (tiny everything)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--quiet", action="store_true", help="no Tune tables, no progress lines")
    p.add_argument("--verbose", action="store_true", help="Tune's result box for every report")
    p.add_argument("--force-promote", action="store_true",
                   help="move the registry alias to this run's evaluated model even if it does "
                   "not beat the champion or raised a masking flag (logged as a tag)")  # fmt: skip
    return p.parse_args(argv)


def _shipped(name: str) -> Path:
    """``configs/<name>.yaml`` of the working directory, else of this checkout."""
    local = Path("configs") / f"{name}.yaml"
    return local if local.is_file() else _ROOT / "configs" / f"{name}.yaml"


def resolve_config(args: argparse.Namespace) -> Config:
    """The config file (``--config``, ``--smoke``: configs/smoke.yaml, else configs/default.yaml)
    with the command-line overrides."""
    if args.smoke and args.config is not None:
        raise ConfigError("--smoke is --config configs/smoke.yaml: give one of them")
    path = args.config or _shipped("smoke" if args.smoke else "default")
    return load_config(path, args.overrides)


def _stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages: unknown {unknown or 'empty'}; use a subset of {STAGES}")
    return stages


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


def _preflight(args: argparse.Namespace) -> tuple[Config, list[str], Path, str, Any, Any]:
    """Config, stages, run directory, tracking URI, data set and the state to resume (None for
    a new run), with nothing written.

    Raises:
        ConfigError, DataError, ValueError, KeyError, FileNotFoundError: exit 2.
        TrackingUnavailable: exit 3.
    """
    from pipeline.preflight import (
        check_resume,
        check_resume_store,
        check_run_dir,
        validate_config,
    )
    from pipeline.tracking_uri import check_reachable, resolve_tracking_uri
    from rarn.data import load_dataset

    cfg = resolve_config(args)
    stages = _stages(args.stages)
    if args.quiet and args.verbose:
        raise ConfigError("--quiet and --verbose: give one of them")
    if args.num_cpus is not None and not 1 <= args.num_cpus <= 4096:
        raise ConfigError(f"--num-cpus: {args.num_cpus} not allowed; give 1 to 4096")
    if os.environ.get("RAY_ADDRESS"):
        from pipeline.cluster import check_ray_address

        check_ray_address(os.environ["RAY_ADDRESS"])  # seconds, not ray.init's minutes
    validate_config(cfg, stages, args.resume)
    run_dir = check_run_dir(cfg, args.resume)
    state = check_resume(cfg, run_dir, stages) if args.resume else None
    uri = resolve_tracking_uri(cfg.tracking)  # the config or the environment, never state.json
    check_reachable(uri)  # seconds, not MLflow's minutes of retries
    if state is not None:
        check_resume_store(cfg, run_dir, stages, state, uri)
    return cfg, stages, run_dir, uri, load_dataset(cfg.data), state


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; returns the exit code (see the module docstring)."""
    apply_env_defaults(connect=bool(os.environ.get("RAY_ADDRESS")))  # before anything imports ray
    from pipeline.preflight import check_resume, check_resume_store, check_run_dir
    from pipeline.runlock import RunDirLock, RunDirLocked
    from pipeline.tracking_uri import TrackingUnavailable
    from rarn.data import DataError

    args = parse_args(argv)
    echo = (lambda _: None) if args.quiet else (lambda s: print(s, flush=True))
    lock = None
    try:
        cfg, stages, run_dir, uri, bundle, state = _preflight(args)
        lock = RunDirLock(run_dir, lambda s: print(s, file=sys.stderr)).acquire()
        # Again under the lock: another run may have just finished or changed the state here.
        if args.resume:
            state = check_resume(cfg, run_dir, stages)
            check_resume_store(cfg, run_dir, stages, state, uri)
        else:
            check_run_dir(cfg, False)
    except TrackingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT["tracking"]
    except (ConfigError, DataError, ValueError, KeyError, FileNotFoundError, RunDirLocked) as e:
        _release(lock)
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return EXIT["usage"]
    try:
        return _run(args, argv, cfg, stages, run_dir, uri, bundle, state, echo)
    except Exception as e:
        fault = _fs_cause(e)
        if fault is None:
            if isinstance(e, _tracking_errors()):
                hint = _resume_hint(args, argv, run_dir)
                where = f"tracking store {redact_uri(uri)}"
                print(
                    f"error: {where} failed during the run: {_one_line(e)}{hint}", file=sys.stderr
                )
                return EXIT["tracking"]
            raise
        print(f"error: {_fs_fault(fault, run_dir)}", file=sys.stderr)
        return EXIT["failed"]
    finally:
        _release(lock)


# Disk full, quota, read-only file system, permission denied: reported, not thrown.
_FS_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _fs_cause(e: BaseException) -> OSError | None:
    """The file-system fault behind ``e`` (itself, or what it wraps: Ray and Tune re-raise),
    or None."""
    seen: list[BaseException] = []
    while e is not None and len(seen) < 10 and all(e is not s for s in seen):
        if isinstance(e, OSError) and e.errno in _FS_FAULTS:
            return e
        seen.append(e)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _fs_fault(e: OSError, run_dir: Path) -> str:
    """One line: what failed, on which path, and how to continue."""
    path = e.filename or "?"
    what = os.strerror(e.errno) if e.errno else str(e)
    text = f"{what}: {path}"
    if (run_dir / "state.json").is_file():  # written atomically: the last save is intact
        return f"{text}; free space or fix permissions there, then rerun with --resume"
    return f"{text}; free space or fix permissions there, then run again (nothing to resume)"


def _resume_hint(args: argparse.Namespace, argv: Sequence[str] | None, run_dir: Path) -> str:
    """``; continue with: ...--resume`` when the run wrote a state to resume, else ''."""
    if not (run_dir / "state.json").is_file():
        return " (nothing to resume: run it again)"
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    return "; continue with: " + shlex.join(["python", "pipeline/run.py", *given, "--resume"])


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """MLflow's error after its (bounded) retries; requests' connection errors."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return (MlflowException, RequestException)


def _release(lock: Any) -> None:
    """Drop the run directory's lock; remove the directory if this run created it and wrote
    nothing into it (a failed start leaves the file system as it was)."""
    if lock is not None:
        lock.release()
        if lock.created:
            with contextlib.suppress(OSError):
                lock.run_dir.rmdir()  # only if empty


def _run(args: argparse.Namespace, argv: Sequence[str] | None, cfg: Config, stages: list[str],
         run_dir: Path, uri: str, bundle: Any, state: Any, echo: Any) -> int:  # fmt: skip
    """Everything after the pre-flight, with the run directory locked. The run directory gets
    its files only once the tracking store answered (a failure before leaves it as it was)."""
    from pipeline.report import done_message, summary
    from pipeline.stages import Pipeline, PipelineError
    from pipeline.state import RunState
    from rarn.config import dump_config

    started = _init_ray(args)
    pipe = None
    try:
        _sigterm_as_sigint()  # after ray.init: Ray's own handler would abort the driver
        try:
            for warning in _check_cluster(cfg, stages, run_dir, uri):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT["usage"]
        from pipeline.tracking import end_pipeline_run, log_stage_times, prepare_tracking

        # The tracking URI is the config's or the environment's (checked in the pre-flight);
        # state.json's copy is informational only (redacted), never used to connect.
        state = state or RunState()
        state.tracking_uri = redact_uri(uri)
        tracking = prepare_tracking(
            cfg, uri=uri, run_dir=run_dir, fingerprint=bundle.fingerprint,
            parent_run_id=state.parent_run_id or None,
        )  # fmt: skip
        state.experiment_id, state.parent_run_id = tracking.experiment_id, tracking.parent_run_id
        if not args.resume:
            dump_config(cfg, run_dir / "config.yaml")
        state.save(run_dir)
        level = 0 if args.quiet else 2 if args.verbose else 1
        pipe = Pipeline(cfg, run_dir, state, tracking, args.resume, echo, level, bundle=bundle,
                        force_promote=args.force_promote)  # fmt: skip
        t0 = time.monotonic()
        times: dict[str, float] = {}  # wall seconds per stage (this invocation's)
        for stage in STAGE_TABLE:  # the stage order
            if stage.runs(cfg, stages):
                _timed(times, stage.name, getattr(pipe, stage.name))
        times["total"] = time.monotonic() - t0
        log_stage_times(tracking, times)
        end_pipeline_run(tracking, "FINISHED")
        text = summary(state, experiment=cfg.tracking.experiment, tracking_uri=tracking.uri,
                       parent_run_id=tracking.parent_run_id, run_dir=run_dir,
                       stage_times=times)  # fmt: skip
        echo(done_message(time.monotonic() - t0, text))
        return EXIT["ok"]
    except KeyboardInterrupt:
        _close(pipe, "KILLED")
        print(f"\ninterrupted{_resume_hint(args, argv, run_dir)}", file=sys.stderr)
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


def _timed(times: dict[str, float], name: str, fn: Any) -> None:
    """Run ``fn()`` and record its wall seconds under ``name`` (for the summary and MLflow)."""
    t = time.monotonic()
    fn()
    times[name] = time.monotonic() - t


def _sigterm_as_sigint() -> None:
    """Handle SIGTERM like Ctrl-C: Tune saves its state, runs end KILLED, exit 130 with the
    resume hint. ``ray job stop`` and Kubernetes stop with SIGTERM; without this, Ray's fatal
    signal handler dumps a stack and aborts the driver (exit -6), and runs stay RUNNING."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def _check_cluster(cfg: Config, stages: list[str], run_dir: Path, uri: str) -> list[str]:
    """Resources and multi-node safety (:mod:`pipeline.cluster`), before anything is written."""
    from pipeline.cluster import check_cluster
    from pipeline.storage import run_storage_path

    return check_cluster(
        cfg, stages, joined=bool(os.environ.get("RAY_ADDRESS")), uri=uri, run_dir=run_dir,
        storage_path=run_storage_path(cfg, run_dir),
    )  # fmt: skip


def _close(pipe: Any, status: str) -> None:
    """End the parent and any child left RUNNING (KILLED on interrupt, FAILED on error)."""
    if pipe is None:
        return
    from pipeline.tracking import end_pipeline_run

    try:
        end_pipeline_run(pipe.tracking, status)
    except Exception:  # never mask the original error
        log.exception("could not close the MLflow runs")


if __name__ == "__main__":
    sys.exit(main())
