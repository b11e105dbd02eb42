"""What a person watching a search sees: a compact Tune table and one line per finished trial.

Ray Tune's default console prints a result box of every reported metric (two dozen) for every
trial and epoch; with dozens of trials the useful table drowns. By default the search uses
Tune's classic console with a :class:`ray.tune.CLIReporter` restricted to the columns that
matter (trial, status, epoch, validation accuracy, the constraint's robust proxy
``P(h <= 0)``, the bound's mean ``mu_F`` and the constraint ``h``), printed when it changed,
plus one line per finished or failed trial (:func:`trial_lines`).
``--verbose`` brings Tune's own per-result boxes back; ``--quiet`` prints nothing.

Levels (``Pipeline.verbose``): 0 quiet, 1 compact (default), 2 Tune's boxes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["COLUMNS", "attach", "classic_output", "progress_reporter", "trial_line",
           "trial_lines", "tune_verbosity"]  # fmt: skip

# metric -> column header (μ_F in ASCII: consoles and log files without UTF-8 exist)
COLUMNS: dict[str, str] = {
    "epoch": "epoch",
    "val_acc": "val acc",
    "p_satisfied": "P(h<=0)",
    "mu_F": "mu_F",
    "h": "h",
}


def tune_verbosity(level: int) -> int:
    """Tune's ``verbose`` for our level: 0 silent, 1 status table only, 3 every result."""
    return {0: 0, 1: 1}.get(level, 3)


@contextlib.contextmanager
def classic_output(level: int) -> Iterator[None]:
    """Use Tune's classic console (the one that honours a ``progress_reporter``) while the
    block runs, unless ``level`` asks for Tune's own output or the user chose an engine."""
    key = "RAY_AIR_NEW_OUTPUT"
    if level >= 2 or key in os.environ:
        yield
        return
    os.environ[key] = "0"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def attach(tuner: Any, *, level: int, callbacks: Sequence[Any], reporter: Any) -> None:
    """Set the console and the driver-side callbacks of a built or restored ``Tuner``.

    Done after construction, on the tuner's own run config, because ``Tuner`` pickles its run
    config into ``tuner.pkl`` when built (callbacks holding this run's state must not be
    pickled, nor come back from an old pickle) and ``Tuner.restore`` takes no run config.
    The one private Ray attribute the pipeline reads: Ray has no public way to reach a restored
    tuner's run config (ray-project/ray#41364, open; pinned Ray 2.60.0), and the resume tests
    (tests/test_pipeline_resume.py, test_pipeline_console.py) fail at once if it goes away.
    """
    rc = tuner._local_tuner.get_run_config()
    rc.verbose = tune_verbosity(level)
    rc.progress_reporter = reporter
    rc.callbacks = [*(rc.callbacks or []), *callbacks]


def progress_reporter(select_metric: str, level: int) -> Any:
    """The compact table (None at levels other than 1: Tune's own choice). It is printed when
    a trial's status or epoch changed, at most every 10 s, and at the end."""
    if level != 1:
        return None
    from ray.tune import CLIReporter

    class _OnChange(CLIReporter):
        _seen: tuple = ()

        def should_report(self, trials: list, done: bool = False) -> bool:
            seen = tuple((t.trial_id, t.status, (t.last_result or {}).get("epoch")) for t in trials)
            if done or (seen != self._seen and super().should_report(trials, done)):
                self._seen = seen
                return True
            return False

    columns = dict(COLUMNS)
    columns.setdefault(select_metric, select_metric)
    return _OnChange(
        metric_columns=columns,
        parameter_columns={"trial/key": "trial"},
        max_report_frequency=10,
        max_column_length=12,
        print_intermediate_tables=True,
    )


def trial_line(trial: Any, error: bool = False) -> str:
    """``[search] t01 finished: epoch 2, val acc 0.512, ... ({overrides})``."""
    config = trial.config.get("trial", {})
    key = config.get("key", str(trial))
    point = ", ".join(f"{k}={v}" for k, v in config.items() if k != "key")
    last = trial.last_result or {}
    shown = [f"{h} {last[m]:.4g}" for m, h in COLUMNS.items()
             if isinstance(last.get(m), (int, float))]  # fmt: skip
    state = "FAILED" if error else "finished"
    return f"[search] {key} {state}: {', '.join(shown) or 'no result'}" + (
        f" ({point})" if point else ""
    )


def trial_lines(echo: Callable[[str], None]) -> Any:
    """A Tune callback printing :func:`trial_line` once per finished or failed trial."""
    from ray.tune import Callback

    class _TrialLines(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            echo(trial_line(trial))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any):
            echo(trial_line(trial, error=True))

    return _TrialLines()
