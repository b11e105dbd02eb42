"""Comparing a study's variants with the search seed as the unit (docs/study.md).

A study retrains one network per (variant, seed) and evaluates all of them on the same test
images, so a variant and a reference pair up by seed: ``d_s = acc(variant, s) - acc(reference,
s)``. The claims rest on these per-seed differences, never on (image, seed) pairs pooled as if
independent:

* a test over seeds: Wilcoxon's signed-rank test and the paired t-test
  (``scipy.stats.wilcoxon``, ``scipy.stats.ttest_1samp`` on ``d_s``), both two-sided. With n
  seeds the signed-rank test cannot go below ``2 / 2**n`` (0.0625 for 5 seeds);
* an interval for the mean difference from a hierarchical bootstrap: resample the seeds with
  replacement, then, within each drawn seed, the test images with replacement (paired: the same
  images for both networks), so both sources of variation, the search's and the finite test
  set's, enter the interval. Within a seed only the image-level differences ``a_i - b_i`` in
  {-1, 0, 1} matter, so an image resample is one multinomial draw of their counts.

The primary metric, fixed before any run, is the worst case over the attacks that ran on every
test image (:data:`PRIMARY`). Pure numpy and scipy; the rows are dicts as
:func:`rarn.study.read_runs_csv` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PRIMARY",
    "Comparison",
    "compare",
    "hierarchical_bootstrap",
    "paired_by_seed",
    "seed_tests",
]

PRIMARY = "worst_case_full_acc"
"""The primary metric: worst case over FGSM/PGD/MIM/CW on all test images (AutoAttack, run on a
subset only, is the headline's companion, not the primary)."""


@dataclass(frozen=True)
class Comparison:
    """``variant`` minus ``reference`` on ``metric``, paired by seed."""

    variant: str
    reference: str
    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # d_s, in the order of `seeds`
    mean: float  # mean of d_s
    ci_low: float  # hierarchical bootstrap interval of the mean (level `level`)
    ci_high: float
    level: float
    wilcoxon_p: float  # two-sided, over seeds (1.0 when every d_s is 0)
    t_p: float  # paired t-test, two-sided (NaN with fewer than 2 seeds or no spread)
    images: bool  # True: the bootstrap resampled images too (per-image masks were at hand)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def paired_by_seed(
    rows: Iterable[Mapping[str, Any]], variant: str, reference: str, metric: str = PRIMARY
) -> tuple[list[int], list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The seeds both variants have a finite ``metric`` for, and their rows in that order.

    Raises:
        ValueError: a (variant, seed) appears twice.
    """
    by: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in rows:
        k = (str(r["variant"]), int(r["seed"]))
        if k in by:
            raise ValueError(f"two rows for variant {k[0]!r}, seed {k[1]}")
        by[k] = r

    def ok(v: str, s: int) -> bool:
        x = by.get((v, s), {}).get(metric)
        return x is not None and math.isfinite(float(x))

    seeds = sorted(s for v, s in by if v == variant and ok(variant, s) and ok(reference, s))
    return seeds, [by[(variant, s)] for s in seeds], [by[(reference, s)] for s in seeds]


def seed_tests(differences: Sequence[float]) -> tuple[float, float]:
    """Two-sided p-values over seeds: ``(Wilcoxon signed-rank, paired t)`` of ``d_s`` against 0.

    Wilcoxon is 1.0 when every difference is 0 (no evidence either way); t is NaN with fewer
    than two seeds or when the differences do not vary.
    """
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    if len(d) == 0 or not np.any(d):
        return 1.0, math.nan if len(d) < 2 else 1.0
    w = float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    t = math.nan
    if len(d) >= 2 and np.ptp(d) > 0:  # equal differences: no t statistic (not float noise)
        t = float(stats.ttest_1samp(d, 0.0).pvalue)
    return w, t


def hierarchical_bootstrap(
    a: Sequence[np.ndarray] | None,
    b: Sequence[np.ndarray] | None,
    *,
    per_seed: Sequence[float] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap replicates of the mean over seeds of the paired difference ``a - b``.

    Args:
        a, b: per seed, bool (n_images,) masks (correct under the metric) of the two networks on
            the same images, in the same order. None: no per-image data, and only the seeds are
            resampled (from ``per_seed``).
        per_seed: the per-seed differences, needed when ``a`` and ``b`` are None.
        n_boot: replicates.
        seed: seed of the generator.

    Returns:
        (n_boot,) float64 replicates; each draws the seeds with replacement, then, for every
        drawn seed independently, its images with replacement.
    """
    rng = np.random.default_rng(seed)
    if a is None or b is None:
        d = np.asarray(per_seed, dtype=np.float64)
        if d.size == 0:
            raise ValueError("hierarchical_bootstrap: no seeds")
        return d[rng.integers(0, len(d), (n_boot, len(d)))].mean(axis=1)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"hierarchical_bootstrap: {len(a)} vs {len(b)} seeds")
    n = np.array([len(x) for x in a])
    if any(len(x) != len(y) for x, y in zip(a, b)) or np.any(n == 0):
        raise ValueError("hierarchical_bootstrap: the two masks of a seed differ in length")
    # per seed: the shares of images where a wins, b wins, neither (a_i - b_i = +1, -1, 0)
    p = np.array(
        [
            [np.mean(x & ~y), np.mean(~x & y), np.mean(x == y)]
            for x, y in ((np.asarray(x, bool), np.asarray(y, bool)) for x, y in zip(a, b))
        ]
    )
    s = len(a)
    picks = rng.integers(0, s, (n_boot, s))  # seeds, with replacement
    counts = rng.multinomial(n[picks], p[picks])  # (n_boot, s, 3): one image resample per slot
    return ((counts[..., 0] - counts[..., 1]) / n[picks]).mean(axis=1)


def _mask(row: Mapping[str, Any]) -> np.ndarray | None:
    m = row.get("worst_case_mask")
    return m if isinstance(m, np.ndarray) and m.size else None


def compare(
    rows: Iterable[Mapping[str, Any]],
    variant: str,
    reference: str,
    *,
    metric: str = PRIMARY,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """``variant`` against ``reference`` over their common seeds (see the module docstring).

    The bootstrap resamples images when every paired row carries its per-image
    ``worst_case_mask`` (:func:`rarn.study.read_runs_csv` decodes it) and ``metric`` is the
    primary one it belongs to; otherwise it resamples seeds only (``images`` False).

    Raises:
        ValueError: no seed has both variants.
    """
    rows = list(rows)
    seeds, va, ref = paired_by_seed(rows, variant, reference, metric)
    if not seeds:
        raise ValueError(f"no seed has both {variant!r} and {reference!r} with {metric}")
    d = [float(x[metric]) - float(y[metric]) for x, y in zip(va, ref)]
    a = [_mask(r) for r in va]
    b = [_mask(r) for r in ref]
    images = metric == PRIMARY and all(m is not None for m in a + b)
    if images and any(len(x) != len(y) for x, y in zip(a, b)):
        images = False  # evaluated on different numbers of images: not paired image by image
    reps = hierarchical_bootstrap(
        a if images else None, b if images else None, per_seed=d, n_boot=n_boot, seed=seed
    )
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    w, t = seed_tests(d)
    return Comparison(
        variant, reference, metric, tuple(seeds), tuple(d), float(np.mean(d)), float(lo),
        float(hi), level, w, t, images,
    )  # fmt: skip
