"""A whole search, timed: ``rarn.run_search`` on a config (epochs, robust evaluation and the
end-of-search decodings included), as the pipeline's search stage runs it per trial.

Prints one JSON line: the wall and process CPU seconds of the search, per epoch (from the
epoch callback) and of what follows the last epoch (the decodings), the threads, the decoded
genotype's sha256. It uses only ``rarn``'s public names that every revision since the first
study has (``load_config``, ``load_dataset``, ``SearchData``, ``run_search``), so ``--root``
times an older checkout's ``rarn`` with this interpreter (issue 20, item 2: the 8-epoch search
at the acceptance shape, before and after, side by side on one machine):

    python benchmarks/search_time.py --threads 2 search.epochs=8 data.name=cifar10-npz \
        data.path=../shared/data/cifar10_subset.npz data.limit=4000 data.test_limit=10 \
        data.image_size=16
    python benchmarks/search_time.py --root /path/to/old/checkout --threads 2 <same overrides>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose rarn is timed")
    ap.add_argument("--config", default="configs/default.yaml", help="relative to --root")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))  # wins over an editable install of another checkout
    import torch

    from rarn import SearchData, load_config, load_dataset, run_search

    torch.set_num_threads(args.threads)
    os.chdir(root)  # relative data paths of the config resolve as in that checkout
    cfg = load_config(args.config, args.overrides)
    bundle = load_dataset(cfg.data)
    data = SearchData.from_bundle(bundle, cfg.data.train_portion, cfg.data.seed)
    marks: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_search(
        cfg.search, cfg.constraint, data, callbacks=[lambda e, m: marks.append(time.perf_counter())]
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    epochs = [b - a for a, b in zip([t0, *marks], marks)]
    print(json.dumps({
        "benchmark": "search_time", "root": str(root), "threads": args.threads,
        "overrides": args.overrides, "search_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "epoch_s": [round(e, 1) for e in epochs],
        "after_last_epoch_s": round(wall - sum(epochs), 1),
        "genotype_sha256": result.genotype.sha256(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
