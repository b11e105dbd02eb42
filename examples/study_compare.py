"""Paired comparison of a study's variants on the same test images (docs/constraint.md).

Every model of a study is evaluated on the same images, so two variants can be compared image by
image: for each seed, the images one variant's model survives (worst case over the attacks that
ran on every image) and the other's does not, pooled over seeds, and a two-sided sign test on
those discordant images (scipy.stats.binomtest). Reads only the per-image records; reruns nothing.

    python examples/study_compare.py runs/study_cifar10_subset --base racl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
from scipy.stats import binomtest

from pipeline.state import RunState
from pipeline.study import study_rows
from rarn.config import load_config
from rarn.robust.evaluation import worst_case_from_records


def _masks(run_dir: Path, key: str, attacks: list[str]) -> list[bool]:
    table = pq.read_table(run_dir / "evaluation" / key / "records.parquet")
    return worst_case_from_records(table, attacks=attacks)[key].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--base", default="racl", help="the variant the others are compared with")
    p.add_argument("--attacks", default="fgsm,pgd,mim,cw", help="attacks run on every image")
    args = p.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    rows = study_rows(cfg, RunState.load(args.run_dir), args.run_dir)
    by: dict[str, dict[int, str]] = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["seed"]] = r["key"]
    attacks = args.attacks.split(",")
    for other in (v for v in by if v != args.base):
        base_only = other_only = 0
        for seed in sorted(set(by[args.base]) & set(by[other])):
            a = _masks(args.run_dir, by[args.base][seed], attacks)
            b = _masks(args.run_dir, by[other][seed], attacks)
            base_only += sum(x and not y for x, y in zip(a, b))
            other_only += sum(y and not x for x, y in zip(a, b))
        n = base_only + other_only
        p_value = binomtest(base_only, n).pvalue if n else 1.0
        print(
            json.dumps(
                {
                    "base": args.base,
                    "other": other,
                    "base_only_robust": base_only,
                    "other_only_robust": other_only,
                    "sign_test_p": round(p_value, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
