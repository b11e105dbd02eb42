"""Compare a study's variants with the search seed as the unit, from its committed CSV.

Reads ``runs.csv`` (written by the study stage into ``<run_dir>/study/`` and copied to
``docs/study/``), and for every variant against ``random`` and against ``constraint_off``
prints one JSON line: the per-seed paired differences of the primary metric (the worst case over
the attacks that ran on every test image), their mean, the hierarchical-bootstrap interval
(seeds, then images within a seed) and the Wilcoxon signed-rank and paired t p-values over seeds
(rarn.stats; docs/study.md, "Data and protocol"). Reruns nothing.

    python examples/study_compare.py docs/study/runs.csv
    python examples/study_compare.py runs/study_cifar10_subset/study/runs.csv --metric clean_acc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rarn import compare, read_runs_csv
from rarn.stats import PRIMARY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path, help="a study's runs.csv")
    p.add_argument("--references", default="random,constraint_off")
    p.add_argument("--metric", default=PRIMARY, help=f"a CSV column (default: {PRIMARY})")
    p.add_argument("--n-boot", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args = p.parse_args()
    rows = read_runs_csv(args.csv)
    variants = sorted({r["variant"] for r in rows})
    for reference in args.references.split(","):
        for variant in (v for v in variants if v != reference):
            try:
                c = compare(rows, variant, reference, metric=args.metric, n_boot=args.n_boot,
                            seed=args.seed)  # fmt: skip
            except ValueError as e:  # no common seed (e.g. a reference that did not run)
                print(json.dumps({"variant": variant, "reference": reference, "skipped": str(e)}))
                continue
            out = c.to_dict() | {"differences": [round(d, 4) for d in c.differences]}
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in out.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
