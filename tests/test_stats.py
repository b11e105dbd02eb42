"""rarn.stats: the seed as the unit, on small synthetic studies with and without an effect."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rarn.stats import PRIMARY, compare, hierarchical_bootstrap, paired_by_seed, seed_tests

SEEDS = range(6)
N = 400  # test images per network


def _study(effect: float, seed: int = 0) -> list[dict]:
    """Per seed a search quality shared by nothing else (seed-level noise), then per image a
    coin with P(robust) = base + seed noise (+ effect for racl): rows as read_runs_csv gives."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in SEEDS:
        for variant, shift in (("racl", effect), ("random", 0.0), ("constraint_off", 0.0)):
            p = 0.3 + shift + rng.normal(0, 0.02)
            mask = rng.random(N) < p
            rows.append({"variant": variant, "seed": s, PRIMARY: float(mask.mean()),
                         "clean_acc": 0.6, "worst_case_mask": mask})  # fmt: skip
    return rows


def test_a_known_effect_is_found_over_seeds():
    for reference in ("random", "constraint_off"):
        c = compare(_study(effect=0.15), "racl", reference, n_boot=4000)
        assert c.seeds == tuple(SEEDS) and c.images
        assert c.mean == pytest.approx(np.mean(c.differences))
        assert 0.08 < c.ci_low < c.mean < c.ci_high < 0.22  # around the true 0.15
        assert c.wilcoxon_p == pytest.approx(2 / 2**6)  # all 6 positive: the smallest possible
        assert c.t_p < 0.01


def test_no_effect_is_no_evidence():
    c = compare(_study(effect=0.0, seed=3), "racl", "random", n_boot=4000)
    assert c.ci_low < 0 < c.ci_high
    assert c.wilcoxon_p > 0.1 and c.t_p > 0.1


def test_the_interval_covers_image_noise_too():
    """One seed: only the images vary; the interval is the binomial one of the paired mean."""
    a = [np.arange(1000) % 4 == 0]  # 0.25
    b = [np.arange(1000) % 5 == 0]  # 0.20
    reps = hierarchical_bootstrap(a, b, n_boot=4000, seed=1)
    assert reps.mean() == pytest.approx(0.05, abs=0.003)
    d = a[0].astype(float) - b[0].astype(float)
    assert reps.std() == pytest.approx(d.std() / math.sqrt(1000), rel=0.1)
    assert not hierarchical_bootstrap(a, a, n_boot=100).any()  # identical networks: 0 always


def test_without_masks_the_seeds_alone_are_resampled():
    rows = _study(effect=0.1)
    for r in rows:
        r["worst_case_mask"] = np.zeros(0, dtype=bool)  # an empty CSV cell
    c = compare(rows, "racl", "random", n_boot=2000)
    assert not c.images and min(c.differences) <= c.ci_low < c.ci_high <= max(c.differences)
    other = compare(rows, "racl", "random", metric="clean_acc", n_boot=200)
    assert other.mean == 0.0 and other.wilcoxon_p == 1.0 and not other.images


def test_pairs_are_by_seed_and_a_repeated_pair_is_an_error():
    rows = _study(effect=0.0)
    rows = [r for r in rows if not (r["variant"] == "random" and r["seed"] == 2)]
    rows[0] = dict(rows[0], **{PRIMARY: math.nan})  # racl seed 0 not evaluated
    seeds, a, b = paired_by_seed(rows, "racl", "random")
    assert seeds == [1, 3, 4, 5] and [r["seed"] for r in a + b] == seeds * 2
    with pytest.raises(ValueError, match="two rows for variant 'racl', seed 1"):
        paired_by_seed([*rows, rows[3]], "racl", "random")
    with pytest.raises(ValueError, match="no seed has both"):
        compare(rows, "racl", "nope")


def test_seed_tests_edge_cases():
    assert seed_tests([0.0, 0.0, 0.0]) == (1.0, 1.0)
    w, t = seed_tests([0.1])
    assert w == 1.0 and math.isnan(t)
    w, t = seed_tests([0.1, 0.1, 0.1])  # no spread: no t statistic
    assert w == pytest.approx(0.25) and math.isnan(t)
