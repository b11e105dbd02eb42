"""Robustness evaluation: per-attack and worst-case accuracy, gradient-masking checks, results.

The evaluation protocol of spec section 6.1, in these modules:

* :mod:`~rarn.robust.evaluation.settings`: :class:`SuiteSettings`, what the suite runs (the
  ``evaluation`` section's defaults, :meth:`SuiteSettings.from_config`), and its resolved plan.
* :mod:`~rarn.robust.evaluation.suite`: :func:`evaluate_robustness` runs the attack suite
  described by a :class:`SuiteSettings` on one model: clean, per-attack and per-sample
  worst-case accuracy (AutoAttack's ``robust`` mask), and an accuracy-vs-eps curve.
* :mod:`~rarn.robust.evaluation.named`: the entries of a suite, each a registry attack under its
  own name with its own parameters and image subset (:class:`NamedAttack`), checked by
  :func:`named_suite` for the config and the library alike.
* :mod:`~rarn.robust.evaluation.evidence`: the suite's per-image results as evidence for the
  masking checks.
* :mod:`~rarn.robust.evaluation.masking`: the nine named gradient-masking checks; every result
  carries their flags (:data:`MASKING_FLAGS`). :mod:`~rarn.robust.evaluation.masking_probes`:
  the checks that run the model, and :func:`run_masking_checks` on one batch.
* :mod:`~rarn.robust.evaluation.adaptive`: BPDA, EOT and a longer Square when a check fires,
  folded into the worst case, each flag confirmed or refuted.
* :mod:`~rarn.robust.evaluation.stats`: 95 % Wilson intervals and the exact paired (McNemar)
  test of two models on the same images.
* :mod:`~rarn.robust.evaluation.results`: :class:`RobustnessResult` and its fixed-schema pyarrow
  table (:data:`RESULTS_SCHEMA`), written as Parquet by :func:`write_results`.
* :mod:`~rarn.robust.evaluation.records`: the per-image records (:data:`RECORDS_SCHEMA`, one
  row per image x attack, with every attack setting and a sha256 of the data), written by
  :func:`write_records` and recombined into worst cases by :func:`worst_case_from_records`.
* :mod:`~rarn.robust.evaluation.verify`: reruns chosen rows of the records and compares them.
* :mod:`~rarn.robust.evaluation.transfer` and :mod:`~rarn.robust.evaluation.plots`: the
  source x target transfer matrix (:data:`TRANSFER_SCHEMA`) and PNG plots of both tables.
"""

from rarn.robust.evaluation.adaptive import adaptive_plan
from rarn.robust.evaluation.masking import (
    MASKING_FLAGS,
    GradientMaskingWarning,
    check_black_box,
    check_black_box_per_image,
    check_fgsm_vs_pgd,
    check_larger_eps,
    check_more_steps,
    check_more_steps_stronger,
)
from rarn.robust.evaluation.masking_probes import (
    check_probability_outputs,
    check_randomized,
    check_zero_gradients,
    run_masking_checks,
)
from rarn.robust.evaluation.named import NamedAttack, named_suite
from rarn.robust.evaluation.plots import plot_accuracy_vs_eps, plot_transfer_heatmap
from rarn.robust.evaluation.records import (
    RECORDS_SCHEMA,
    DataHasher,
    data_sha256,
    records_table,
    weights_sha256,
    worst_case_from_records,
    write_records,
)
from rarn.robust.evaluation.results import (
    RESULTS_SCHEMA,
    TRANSFER_SCHEMA,
    RobustnessResult,
    results_table,
    write_results,
)
from rarn.robust.evaluation.settings import SuiteSettings
from rarn.robust.evaluation.stats import (
    Interval,
    PairedTest,
    accuracy_interval,
    pack_mask,
    paired_test,
    unpack_mask,
    wilson_interval,
)
from rarn.robust.evaluation.suite import evaluate_robustness
from rarn.robust.evaluation.transfer import add_transfer, transfer_matrix
from rarn.robust.evaluation.verify import RowCheck, choose_rows, verify_records

__all__ = [
    "MASKING_FLAGS",
    "RECORDS_SCHEMA",
    "RESULTS_SCHEMA",
    "TRANSFER_SCHEMA",
    "DataHasher",
    "GradientMaskingWarning",
    "Interval",
    "NamedAttack",
    "PairedTest",
    "RowCheck",
    "RobustnessResult",
    "SuiteSettings",
    "accuracy_interval",
    "adaptive_plan",
    "add_transfer",
    "check_black_box",
    "check_black_box_per_image",
    "check_fgsm_vs_pgd",
    "check_larger_eps",
    "check_more_steps",
    "check_more_steps_stronger",
    "check_probability_outputs",
    "check_randomized",
    "check_zero_gradients",
    "choose_rows",
    "data_sha256",
    "evaluate_robustness",
    "named_suite",
    "pack_mask",
    "paired_test",
    "plot_accuracy_vs_eps",
    "plot_transfer_heatmap",
    "records_table",
    "results_table",
    "run_masking_checks",
    "transfer_matrix",
    "unpack_mask",
    "verify_records",
    "weights_sha256",
    "wilson_interval",
    "worst_case_from_records",
    "write_records",
    "write_results",
]
