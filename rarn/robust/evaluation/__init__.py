"""Robustness evaluation: per-attack and worst-case accuracy, gradient-masking checks, results.

The evaluation protocol of spec section 6.1, in four modules:

* :mod:`~rarn.robust.evaluation.suite`: :func:`evaluate_robustness` runs the attack suite
  described by a :class:`SuiteSettings` on one model: clean, per-attack and per-sample
  worst-case accuracy (AutoAttack's ``robust`` mask), and an accuracy-vs-eps curve.
* :mod:`~rarn.robust.evaluation.masking`: the six named gradient-masking checks; every result
  carries their flags (:data:`MASKING_FLAGS`).
* :mod:`~rarn.robust.evaluation.results`: :class:`RobustnessResult` and its fixed-schema pyarrow
  table (:data:`RESULTS_SCHEMA`), written as Parquet by :func:`write_results`.
* :mod:`~rarn.robust.evaluation.transfer` and :mod:`~rarn.robust.evaluation.plots`: the
  source x target transfer matrix (:data:`TRANSFER_SCHEMA`) and PNG plots of both tables.
"""

from rarn.robust.evaluation.masking import (
    MASKING_FLAGS,
    GradientMaskingWarning,
    check_black_box,
    check_larger_eps,
    check_more_steps,
    check_probability_outputs,
    check_randomized,
    check_zero_gradients,
    run_masking_checks,
)
from rarn.robust.evaluation.plots import plot_accuracy_vs_eps, plot_transfer_heatmap
from rarn.robust.evaluation.results import (
    RESULTS_SCHEMA,
    TRANSFER_SCHEMA,
    RobustnessResult,
    results_table,
    write_results,
)
from rarn.robust.evaluation.suite import SuiteSettings, evaluate_robustness
from rarn.robust.evaluation.transfer import transfer_matrix

__all__ = [
    "MASKING_FLAGS",
    "RESULTS_SCHEMA",
    "TRANSFER_SCHEMA",
    "GradientMaskingWarning",
    "RobustnessResult",
    "SuiteSettings",
    "check_black_box",
    "check_larger_eps",
    "check_more_steps",
    "check_probability_outputs",
    "check_randomized",
    "check_zero_gradients",
    "evaluate_robustness",
    "plot_accuracy_vs_eps",
    "plot_transfer_heatmap",
    "results_table",
    "run_masking_checks",
    "transfer_matrix",
    "write_results",
]
