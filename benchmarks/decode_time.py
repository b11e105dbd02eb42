"""The end-of-search decoding (every rule, the configured perturbation selection included), timed.

Builds the search of ``--config`` (default ``configs/default.yaml``) plus dotted overrides, runs
``--steps`` weight steps so the batch statistics are a trained supernet's, then times
:func:`rarn.nas.selection.decode_search` on D_V, as :func:`rarn.nas.loop.run_search` calls it at
the end of a search. Prints one JSON line: the seconds, the supernet passes of the perturbation
selection and the genotype's sha256 (equal across revisions when the decoding is unchanged).

    python benchmarks/decode_time.py [--threads 1] [--steps 4] [--config C] [KEY=VALUE ...]
    # the acceptance shape of docs/benchmarks.md:
    python benchmarks/decode_time.py data.name=cifar10-npz \
        data.path=../shared/data/cifar10_subset.npz data.limit=4000 data.test_limit=10 \
        data.image_size=16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rarn import RACLSearch, SearchData, load_config, load_dataset, make_loader
from rarn.nas.selection import decode_search

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="weight steps before the decoding")
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    bundle = load_dataset(cfg.data)
    data = SearchData.from_bundle(bundle, cfg.data.train_portion, cfg.data.seed)
    torch.manual_seed(cfg.search.seed)
    s = RACLSearch(
        cfg.search, cfg.constraint, num_classes=bundle.num_classes, in_channels=bundle.in_channels
    )
    loader = make_loader(data.train, cfg.search.batch_size, shuffle=True)
    for _, (x, y) in zip(range(args.steps), loader):
        s.weight_step(x, y)
    t0 = time.perf_counter()
    sel = decode_search(s, data.val)
    seconds = time.perf_counter() - t0
    imp = sel.importance.get(cfg.search.decode)
    print(json.dumps({
        "decode_s": round(seconds, 2), "rule": cfg.search.decode,
        "passes": imp.evaluations if imp else 0, "threads": args.threads,
        "genotype_sha256": sel.genotype.sha256(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
