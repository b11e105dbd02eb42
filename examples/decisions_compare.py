"""Does the constraint change the decoded genotype beyond seed noise? Compares two variants of
``examples/search_decisions.py``'s output, with the search seed as the unit.

    python examples/decisions_compare.py docs/study/decisions_5seeds.json \
        --variant racl --reference constraint_off

Per decoding rule it prints one JSON line:

* per seed, the genotype's parameter-free edge count, its Lipschitz ranking share (the share of
  edges on their edge's lowest-lambda op, ``rarn.nas.collapse``) and the edge distance between
  the two variants' genotypes (edges whose op or input differ, of 16);
* the paired differences (variant - reference) of the first two over seeds, their mean, a 95 %
  t-interval and the paired t and Wilcoxon p-values (``rarn.stats.seed_tests``);
* seed noise: the mean edge distance between two seeds of the same variant, beside the mean
  distance between the variants at the same seed.

A statistic differs beyond seed noise when its interval excludes 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rarn.stats import seed_tests  # noqa: E402


def edge_distance(a: dict, b: dict) -> int:
    """Edges (of both cells) whose ``(op, input)`` differ between two genotype dicts."""
    return sum(
        tuple(x) != tuple(y) for cell in ("normal", "reduce") for x, y in zip(a[cell], b[cell])
    )


def interval(d: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of paired differences."""
    n, m = len(d), sum(d) / len(d)
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return m, m - half, m + half


def compare(rows: list[dict], variant: str, reference: str, rule: str) -> dict:
    by = {(r["variant"], r["seed"]): r["genotypes"][rule] for r in rows if rule in r["genotypes"]}
    seeds = sorted({s for v, s in by if v == variant} & {s for v, s in by if v == reference})
    out: dict = {"rule": rule, "seeds": seeds, "per_seed": []}
    diffs: dict[str, list[float]] = {"param_free": [], "lambda_ranking": []}
    for s in seeds:
        a, b = by[variant, s], by[reference, s]
        row = {"seed": s, "edge_distance": edge_distance(a["genotype"], b["genotype"])}
        for k in diffs:
            va, vb = _stat(a, k), _stat(b, k)
            row[k] = [va, vb]
            diffs[k].append(va - vb)
        out["per_seed"].append(row)
    for k, d in diffs.items():
        if d:
            m, lo, hi = interval(d)
            p_w, p_t = seed_tests(d)
            out[k] = {"mean_diff": round(m, 3), "ci95": [round(lo, 3), round(hi, 3)]}
            out[k] |= {"p_t": round(p_t, 4), "p_wilcoxon": round(p_w, 4)}
    between = [r["edge_distance"] for r in out["per_seed"]]
    within = [
        edge_distance(by[v, s]["genotype"], by[v, t]["genotype"])
        for v in (variant, reference)
        for s, t in itertools.combinations(seeds, 2)
    ]
    out["edge_distance"] = {
        "between_variants_same_seed": round(sum(between) / max(len(between), 1), 2),
        "between_seeds_same_variant": round(sum(within) / max(len(within), 1), 2),
    }
    return out


def _stat(g: dict, key: str) -> float:
    if key == "param_free":
        return float(g["families"]["param_free"])
    value = g.get("lambda_ranking")
    return math.nan if value is None else float(value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="search_decisions.py --out files")
    p.add_argument("--variant", default="racl")
    p.add_argument("--reference", default="constraint_off")
    p.add_argument("--rules", nargs="*", default=None, help="default: every rule in the rows")
    a = p.parse_args(argv)
    rows = [r for f in a.results for r in json.loads(Path(f).read_text())]
    rules = a.rules or sorted({m for r in rows for m in r["genotypes"]})
    for rule in rules:
        print(json.dumps(compare(rows, a.variant, a.reference, rule)), flush=True)


if __name__ == "__main__":
    main()
