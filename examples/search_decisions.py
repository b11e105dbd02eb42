"""What decides a search: per variant and seed, the constraint's activity per epoch, the
architecture means' movement, and every decoding's genotype with its op-family counts.

    python examples/search_decisions.py --config configs/default.yaml \
        --data cifar --variants racl constraint_off --seeds 3 4 --out docs/study/decisions.json

``--data cifar`` swaps the config's data for the CIFAR-10 JPEG copy in ../shared/data (the first
1,440 training images at 8 x 8, as many as the digits default: D_T 720 / D_V 720): CIFAR-type
images at the config's own search settings. Prints one JSON line per search and writes all of
them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rarn import (  # noqa: E402
    Genotype,
    RACLSearch,
    SearchData,
    load_config,
    load_dataset,
    run_search,
    variant_overrides,
    with_overrides,
)
from rarn.nas.collapse import PARAMETER_FREE  # noqa: E402
from rarn.nas.selection import genotype_log_bound  # noqa: E402

CIFAR = {
    "data.name": "cifar10-jpeg",
    "data.path": str(ROOT.parent / "shared/data/cifar10_jpeg.npz"),
    "data.sha256": "e29c226e1bae1062b7e2249a05a25a0934f569331e30dbd7bf31e7a8430f03f6",
    "data.root": str(ROOT / "data"),
    "data.limit": 1440,
    "data.test_limit": 10,
    "data.image_size": 8,
}
FAMILIES = {"sep": "sep", "dil": "dil", "max": "pool", "avg": "pool", "ski": "skip"}


def families(genotype) -> dict[str, int]:
    """Op-family counts over the 16 edges (sep, dil, pool, skip) and the parameter-free count."""
    ops = [op for op, _ in genotype.normal + genotype.reduce]
    out = dict(Counter(FAMILIES[op[:3]] for op in ops))
    out["param_free"] = sum(op in PARAMETER_FREE for op in ops)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--data", choices=("config", "cifar"), default="cifar")
    p.add_argument("--variants", nargs="+", default=["racl", "constraint_off"])
    p.add_argument("--seeds", nargs="+", type=int, default=[3, 4])
    p.add_argument("--set", nargs="*", default=[], help="extra dotted overrides key=value")
    p.add_argument("--out", default="")
    p.add_argument(
        "--checkpoints",
        default="",
        help="keep each search's checkpoint in DIR/<variant>_<seed> (a finished one is resumed, "
        "so a rerun only decodes; examples/selection_rules.py re-decodes them offline)",
    )
    p.add_argument(
        "--annotate",
        default="",
        help="add each decoding's bound (log_bound) to the rows of this --out file from the "
        "searches' --checkpoints, without searching or decoding",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = load_config(a.config)
    extra = dict(kv.split("=", 1) for kv in a.set)

    def setup(variant: str, seed: int):
        over = {**(CIFAR if a.data == "cifar" else {}), **variant_overrides(variant)}
        over |= {"search.seed": seed, **extra}
        cfg = with_overrides(base, {k: _parse(v) for k, v in over.items()})
        bundle = load_dataset(cfg.data)
        return cfg, SearchData.from_bundle(bundle, cfg.data.train_portion, cfg.data.seed)

    if a.annotate:
        rows = json.loads(Path(a.annotate).read_text())
        for row in rows:
            cfg, data = setup(row["variant"], row["seed"])
            ckpt = Path(a.checkpoints) / f"{row['variant']}_{row['seed']}"
            gens = {m: Genotype.from_dict(g["genotype"]) for m, g in row["genotypes"].items()}
            for mode, bound in _bounds(cfg, data, ckpt, gens).items():
                row["genotypes"][mode]["log_bound"] = bound
        Path(a.annotate).write_text(json.dumps(rows, indent=1))
        return
    rows = []
    for variant in a.variants:
        for seed in a.seeds:
            cfg, data = setup(variant, seed)
            t0 = time.perf_counter()
            ckpt = Path(a.checkpoints) / f"{variant}_{seed}" if a.checkpoints else None
            res = run_search(cfg.search, cfg.constraint, data, checkpoint_dir=ckpt)
            keys = (
                "arch_steps",
                "frac_dual_positive",
                "frac_satisfied",
                "mu_move",
                "kappa",
                "val_acc",
                "val_pgd_acc",
                "log_lambda_faithful",
                "epoch_time",
            )
            row = {
                "variant": variant,
                "seed": seed,
                "time_s": round(time.perf_counter() - t0, 1),
                "decode": cfg.search.decode,
                "decode_objective": cfg.search.decode_objective,
                "epochs": [{k: round(m[k], 4) for k in keys if k in m} for m in res.history],
                "genotypes": {
                    mode: {
                        "families": families(g),
                        "collapsed": res.reports[mode].collapsed,
                        "lambda_ranking": res.reports[mode].lambda_ranking,
                        "genotype": g.to_dict(),
                    }
                    for mode, g in res.genotypes.items()
                },
            }
            arch = [m for m in res.history if m.get("arch_steps", 0) > 0]
            row["binding_share"] = sum(
                m["frac_dual_positive"] * m["arch_steps"] for m in arch
            ) / max(1.0, sum(m["arch_steps"] for m in arch))
            print(
                json.dumps(
                    {k: row[k] for k in ("variant", "seed", "time_s", "binding_share")}
                    | {m: g["families"] for m, g in row["genotypes"].items()}
                ),
                flush=True,
            )
            if ckpt is not None:
                for mode, bound in _bounds(cfg, data, ckpt, res.genotypes).items():
                    row["genotypes"][mode]["log_bound"] = bound
            rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


def _bounds(cfg, data, ckpt: Path, genotypes: dict) -> dict[str, float]:
    """Each decoding's discrete bound under the finished supernet's constants
    (:func:`rarn.nas.selection.genotype_log_bound`), from the search's checkpoint."""
    s = RACLSearch(cfg.search, cfg.constraint, num_classes=data.num_classes,
                   in_channels=data.in_channels)  # fmt: skip
    s.load(ckpt)
    return {mode: round(genotype_log_bound(s, g), 3) for mode, g in genotypes.items()}


def _parse(v):
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


if __name__ == "__main__":
    main()
