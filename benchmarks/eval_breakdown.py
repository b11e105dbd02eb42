"""Where an evaluation's time goes: every attack call of the suite, the masking checks, the eps
curve and the adaptive attacks, timed on a retrained model of a kept first run.

Reads the newest retrained model (``weights.pt``, ``genotype.json``, ``network.json``) under the
folder ``benchmarks/first_run.py --keep DIR`` left, loads it with the portable loader (no pickle),
runs ``rarn.robust.evaluation.evaluate_robustness`` with the config's evaluation section on the
config's test images, and prints one JSON line: the total, the headline, the flags that fired
and per attack call ``[seconds, images, calls]`` keyed ``attack/steps/eps`` (largest first).

    python benchmarks/first_run.py --keep /tmp/fr
    python benchmarks/eval_breakdown.py /tmp/fr [--threads 2] [--config C] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("keep", help="the folder of `benchmarks/first_run.py --keep`")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluation.check_n=64")
    args = p.parse_intermixed_args()

    import rarn.robust.evaluation._core as core
    from pipeline.portable import FILES, load_network
    from rarn import load_config
    from rarn.data.sources import load_dataset
    from rarn.data.tensors import as_tensors
    from rarn.robust.evaluation import SuiteSettings, evaluate_robustness

    torch.set_num_threads(args.threads)
    found = sorted(Path(args.keep).glob("**/artifacts/weights.pt"), key=lambda f: f.stat().st_mtime)
    if not found:
        sys.exit(f"no retrained model (artifacts/weights.pt) under {args.keep}")
    model = load_network({k: found[-1].parent / f for k, f in FILES.items()})
    cfg = load_config(args.config, args.overrides)
    x, y = as_tensors(load_dataset(cfg.data).test)

    spent: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0, 0])
    registry = core.get_attack

    def timed(name: str):
        attack = registry(name)

        def run(model, x, y, **kw):
            t = time.perf_counter()
            out = attack(model, x, y, **kw)
            row = spent[f"{name}/{kw.get('steps', '')}/{kw.get('eps', '')}"]
            row[0] += time.perf_counter() - t
            row[1] += len(x)
            row[2] += 1
            return out

        return run

    core.get_attack = timed  # every attack of the suite, checks, curve and adaptive goes here
    try:
        t = time.perf_counter()
        r = evaluate_robustness(
            model, (x, y), SuiteSettings.from_config(cfg.evaluation),
            generator=torch.Generator().manual_seed(cfg.evaluation.seed),
        )  # fmt: skip
        total = time.perf_counter() - t
    finally:
        core.get_attack = registry
    parts = sorted(spent.items(), key=lambda kv: -kv[1][0])
    print(json.dumps({
        "benchmark": "eval_breakdown", "model": str(found[-1].parent), "threads": args.threads,
        "total_s": round(total, 1), "n": len(y), "clean": r.clean_accuracy,
        "worst_case": r.worst_case_accuracy, "robust_accuracy": r.robust_accuracy,
        "model_form": r.model_form, "flags": sorted(k for k, v in r.flags.items() if v),
        "parts": {k: [round(v[0], 1), v[1], v[2]] for k, v in parts},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
