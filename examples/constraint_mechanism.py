"""Diagnostics of the constraint's mechanism (docs/constraint.md): is it balanced against the CE,
does the chance part matter, does the CE still move the architecture after satisfaction?

Runs short searches of named variants x seeds on a config (by default the CIFAR subset at
16 x 16, C = 8, 5 cells) and prints, per run, one JSON object with per-epoch diagnostics and the
decoded genotype's op histogram; then one summary object per variant (mean and spread over
seeds). Decide on these (gradient ratios, movement of the means, constraint activity), not on
accuracy.

    nice python examples/constraint_mechanism.py --variants old,default --seeds 0,1,2 \\
        --epochs 6 --warmup 2

Every key is ``rarn.config`` dotted; ``--set`` applies overrides to every variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter

import torch

from rarn import (
    RACLSearch,
    SearchData,
    load_config,
    load_dataset,
    log_bound,
    make_loader,
    run_search,
    with_overrides,
)
from rarn.nas.balance import METRICS

# name -> dotted overrides on top of the config (the config's own values are the new default)
VARIANTS: dict[str, dict] = {
    "default": {},
    # the defaults before issue 12: parametric node-mean bound, raw gradient sum, quantile decode
    "old": {
        "constraint.balance": "none",
        "constraint.bound": "node_mean",
        "constraint.mixture": "parametric",
        "constraint.kappa": 0.05,
        "constraint.rho": 1.0,
        "search.decode": "quantile",
    },
    # the default bound, raw gradient sum and dual in nats (rho as before issue 12)
    "unbalanced": {"constraint.balance": "none", "constraint.rho": 1.0},
    "no_chance": {"constraint.eta": 0.5},  # Phi^-1(0.5) = 0: the mean part alone
    "off": {"constraint.enabled": False},
}
EPOCH_KEYS = ("mu_F", "sigma_F", "h", "y", "frac_satisfied", *METRICS, "val_acc")


def _histogram(genotype) -> dict[str, int]:
    return dict(Counter(op for op, _ in (*genotype.normal, *genotype.reduce)))


def _run(cfg, data: SearchData) -> dict:
    """One search, then its diagnostics: per epoch, and of the final architecture."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        result = run_search(cfg.search, cfg.constraint, data, checkpoint_dir=d)
        s = RACLSearch(
            cfg.search, cfg.constraint, num_classes=data.num_classes, in_channels=data.in_channels
        )
        s.load(d)
    with torch.no_grad():  # the true bound of the final architecture, comparable across variants
        final_bound = float(log_bound(s.model.arch.mu(), s.bound_inputs(20), "product", "all"))
    probe = _ce_probe(s, data)
    epochs = [
        {k: round(m[k], 5) for k in EPOCH_KEYS if k in m}
        for m in result.history
        if m.get("arch_steps", 0) > 0
    ]
    q, med = result.genotypes["quantile"], result.genotypes["median"]
    pairs = zip((*q.normal, *q.reduce), (*med.normal, *med.reduce))
    return {
        "epochs": epochs,
        "final_log_bound": round(final_bound, 3),
        "ce_probe_move": round(probe, 6),
        "genotype_ops": _histogram(result.genotype),
        "quantile_vs_median_diff": sum(a != b for a, b in pairs),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _ce_probe(s: RACLSearch, data: SearchData) -> float:
    """Mean |step| of the architecture means over one epoch of CE-only architecture steps from
    the final state (optimiser moments included): the constraint is met and its dual spent, so
    this is how far the CE alone moves the means after satisfaction."""
    s.constraint.threshold, s.constraint.log_lambda_bar, s.constraint.y = "absolute", 1e6, 0.0
    loader = make_loader(data.val, s.cfg.batch_size, shuffle=True, drop_last=True)
    moves = []
    for x, y in loader:
        before = torch.cat([t.detach().flatten() for t in s.model.arch.mu().as_tuple()])
        s.arch_step(x, y)
        after = torch.cat([t.detach().flatten() for t in s.model.arch.mu().as_tuple()])
        moves.append(float((after - before).abs().mean()))
    return statistics.fmean(moves)


def _summary(name: str, runs: list[dict]) -> dict:
    """Mean and spread (min, max) over seeds of the diagnostics that decide the mechanism."""
    out: dict = {"variant": name, "seeds": len(runs)}
    keys = ("penalty_ce_ratio", "bound_ce_ratio", "chance_pull", "confidence_share")
    for k in keys:  # over all architecture epochs
        vals = [statistics.fmean(e[k] for e in r["epochs"]) for r in runs if r["epochs"]]
        out[k] = _spread(vals)
    out["final_log_bound"] = _spread([r["final_log_bound"] for r in runs])
    out["ce_probe_move"] = _spread([r["ce_probe_move"] for r in runs])
    for k in ("mu_move", "mu_move_met", "frac_satisfied", "y", "sigma_mean", "val_acc"):
        out[f"last_{k}"] = _spread([r["epochs"][-1][k] for r in runs if r["epochs"]])
    out["first_bound_ce_ratio"] = _spread([r["epochs"][0]["bound_ce_ratio"] for r in runs])
    ops: Counter = Counter()
    for r in runs:
        ops.update(r["genotype_ops"])
    out["genotype_ops_total"] = dict(ops)
    out["quantile_vs_median_diff"] = _spread([r["quantile_vs_median_diff"] for r in runs])
    return out


# (column, summary key, format); "first_" / "last_" are the first / last architecture epoch
_COLUMNS = (
    ("bound/CE grad (1st arch epoch)", "first_bound_ce_ratio", "{:.3g}"),
    ("applied penalty/CE grad", "penalty_ce_ratio", "{:.3g}"),
    ("confidence share", "confidence_share", "{:.2f}"),
    ("chance pull on μ", "chance_pull", "{:.3f}"),
    ("h≤0 share (last epoch)", "last_frac_satisfied", "{:.2f}"),
    ("y (end)", "last_y", "{:.2f}"),
    ("mean abs Δμ (last epoch)", "last_mu_move", "{:.2g}"),
    ("CE-only step after (probe)", "ce_probe_move", "{:.2g}"),
    ("final true ln λ_F", "final_log_bound", "{:.1f}"),
    ("val acc", "last_val_acc", "{:.3f}"),
)


def markdown(lines: list[str]) -> str:
    """The summaries of a JSONL output as a markdown table: mean [min, max] over seeds."""
    rows = [json.loads(line)["summary"] for line in lines if '"summary"' in line]
    head = (
        "| variant | seeds | "
        + " | ".join(c for c, _, _ in _COLUMNS)
        + " | genotype ops (all seeds) |"
    )
    out = [head, "|" + "---|" * (len(_COLUMNS) + 3)]
    for r in rows:
        cells = []
        for _, key, fmt in _COLUMNS:
            v = r.get(key)
            if not v:  # not measured by that version of this script
                cells.append("—")
                continue
            lo, hi = fmt.format(v["min"]), fmt.format(v["max"])
            cells.append(f"{fmt.format(v['mean'])} [{lo}, {hi}]" if lo != hi else lo)
        ops = ", ".join(f"{k} {n}" for k, n in sorted(r["genotype_ops_total"].items()))
        out.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + f" | {ops} |")
    return "\n".join(out)


def _spread(vals: list[float]) -> dict[str, float]:
    if not vals:
        return {}
    return {"mean": float(f"{statistics.fmean(vals):.5g}"), "min": min(vals), "max": max(vals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/cifar10_subset.yaml")
    ap.add_argument("--variants", default="default,old")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--set", nargs="*", default=[], help="dotted key=value for every variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", help="only print the table of this JSONL output")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(open(args.markdown).read().splitlines()))
        return
    torch.set_num_threads(args.threads)
    base = load_config(args.config, overrides=args.set)
    base = with_overrides(
        base,
        {
            "search.epochs": args.epochs,
            "search.warmup_epochs": args.warmup,
            "data.image_size": args.image_size,
        },
    )
    bundle = load_dataset(base.data)
    data = SearchData.from_bundle(bundle, base.data.train_portion, base.data.seed)
    for name in args.variants.split(","):
        runs = []
        for seed in (int(v) for v in args.seeds.split(",")):
            cfg = with_overrides(base, {**VARIANTS[name], "search.seed": seed})
            run = {"variant": name, "seed": seed, **_run(cfg, data)}
            print(json.dumps(run), flush=True)
            runs.append(run)
        print(json.dumps({"summary": _summary(name, runs)}), flush=True)


if __name__ == "__main__":
    main()
