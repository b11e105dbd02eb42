"""Ablation of the chance-constraint formulation on digits (docs/constraint.md).

For each bound variant x kappa x arch lr (plus the unconstrained search per arch lr), run a short
RACL search on the same seed and record: final mu_F (of the variant's own bound and of the
faithful all-ops product bound), whether the constraint is satisfied at the end, the share of
iterations with h <= 0, the decoded genotype's share of parametric ops, and the FGSM accuracy of
the searched supernet (median architecture) on the held-out digits test split.

    python examples/constraint_ablation.py --epochs 6 --out docs/ablation.json

Prints one JSON line per run and writes all rows to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rarn import (
    ConstraintConfig,
    DataConfig,
    RACLSearch,
    SearchConfig,
    SearchData,
    as_tensors,
    load_dataset,
    log_bound,
    run_search,
)

VARIANTS = {
    # name: (bound, mixture, threshold)
    "faithful (product, all ops, relative)": ("product", "all", "relative"),
    "no-none (product, tracking)": ("product", "no_none", "tracking"),
    "parametric (node mean, tracking)": ("node_mean", "parametric", "tracking"),
}


def fgsm_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    model.eval()
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    with torch.no_grad():
        x_adv = (x + eps * g.sign()).clamp(0, 1)
        return float((model(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kappas", default="0.02,0.1")
    ap.add_argument("--arch-lrs", default="0.0006,0.006")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--out", default="docs/ablation.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reference", action="store_true", help="per-edge reference forward")
    ap.add_argument("--markdown", nargs="+", help="only print the table of these JSON files")
    args = ap.parse_args()
    if args.markdown:
        print(markdown([r for f in args.markdown for r in json.loads(Path(f).read_text())]))
        return
    torch.set_num_threads(args.threads)
    bundle = load_dataset(DataConfig(name="digits"))
    data = SearchData.from_bundle(bundle, 0.5, 0)
    x_test, y_test = as_tensors(bundle.test)
    base = SearchConfig(
        epochs=args.epochs,
        warmup_epochs=args.warmup,
        batch_size=32,
        init_channels=8,
        layers=5,
        seed=args.seed,
        fused=not args.reference,
    )
    runs = []
    for lr in [float(v) for v in args.arch_lrs.split(",")]:
        runs.append(("off", None, lr, ConstraintConfig(enabled=False)))
        for vname, (bound, mixture, threshold) in VARIANTS.items():
            for kappa in [float(v) for v in args.kappas.split(",")]:
                runs.append(
                    (
                        vname,
                        kappa,
                        lr,
                        ConstraintConfig(
                            bound=bound, mixture=mixture, threshold=threshold, kappa=kappa
                        ),
                    )
                )
    rows = []
    for vname, kappa, lr, ccfg in runs:
        scfg = dataclasses.replace(base, arch_lr=lr)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                result = run_search(scfg, ccfg, data, checkpoint_dir=d)
                s = RACLSearch(
                    scfg, ccfg, num_classes=data.num_classes, in_channels=data.in_channels
                )
                s.load(d)
        inputs = s.bound_inputs(20)
        with torch.no_grad():
            faithful = float(log_bound(s.model.arch.mu(), inputs, "product", "all"))
        final = result.final
        row = {
            "variant": vname, "kappa": kappa, "arch_lr": lr,
            "mu_F": final.get("mu_F_last", final.get("mu_F")),
            "mu_F_faithful_product": faithful,
            "satisfied_at_end": bool(final.get("h_last", 1.0) <= 0) if ccfg.enabled else None,
            "frac_h_le_0_last_epoch": final.get("frac_satisfied"),
            "y_end": final.get("y"),
            "parametric_share": final["parametric_share"],
            "val_acc": final["val_acc"],
            "fgsm_acc": fgsm_accuracy(s.model, x_test, y_test, args.eps),
            "genotype": result.genotype.to_dict(),
            "seconds": time.perf_counter() - t0,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def markdown(rows: list[dict]) -> str:
    """The ablation as a markdown table (docs/constraint.md)."""
    head = (
        "| variant | κ | arch lr | final μ_F (own bound) | faithful ln λ_F | satisfied | "
        "h≤0 share (last epoch) | conv share | val acc | FGSM acc |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        sat = "—" if r["satisfied_at_end"] is None else ("yes" if r["satisfied_at_end"] else "no")
        frac = "—" if r["frac_h_le_0_last_epoch"] is None else f"{r['frac_h_le_0_last_epoch']:.2f}"
        kappa = "—" if r["kappa"] is None else f"{r['kappa']:g}"
        lines.append(
            f"| {r['variant']} | {kappa} | {r['arch_lr']:g} | {r['mu_F']:.2f} | "
            f"{r['mu_F_faithful_product']:.1f} | {sat} | {frac} | {r['parametric_share']:.2f} | "
            f"{r['val_acc']:.3f} | {r['fgsm_acc']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
