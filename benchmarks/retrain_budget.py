"""Clean test accuracy bought by a retraining budget: one retraining of a config, timed.

Retrains ``retrain.genotype`` (``searched`` becomes RACL) of ``--config`` (default
``configs/study_cifar10_subset.yaml``) on its retraining images with dotted overrides (the knobs:
``data.retrain_limit``, ``retrain.epochs``, ``retrain.init_channels``, ``retrain.layers``), then
prints one JSON line: clean accuracy on the config's test images, wall and CPU seconds, and both
per image-epoch. What it measures is the study's retraining budget (docs/study.md).

    python benchmarks/retrain_budget.py data.retrain_limit=4000 retrain.epochs=4 data.test_limit=500
    python benchmarks/retrain_budget.py --smoke     # seconds: a code check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from rarn import as_tensors, load_config, load_dataset, run_retrain

SMOKE = ["data.retrain_limit=40", "data.limit=20", "data.test_limit=20", "retrain.epochs=1",
         "retrain.init_channels=4", "retrain.layers=3", "retrain.steps=1"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/study_cifar10_subset.yaml")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny budget: a code check")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*(SMOKE if args.smoke else []), *args.overrides])
    rc = cfg.retrain
    if rc.genotype == "searched":  # no search here: the bundled RACL genotype stands in
        rc = dataclasses.replace(rc, genotype="RACL")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = load_dataset(cfg.data)
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_retrain(rc, bundle, device=device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    x, y = as_tensors(bundle.test)
    model = result.model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(256)])
    image_epochs = len(bundle.retrain_set) * rc.epochs
    print(json.dumps({
        "benchmark": "retrain_budget", "config": args.config, "device": str(device),
        "genotype": rc.genotype, "init_channels": rc.init_channels, "layers": rc.layers,
        "image_size": bundle.image_size, "method": f"{rc.method}-{rc.steps}",
        "retrain_images": len(bundle.retrain_set), "epochs": rc.epochs,
        "test_images": len(y), "clean_test_acc": round(float((pred == y).float().mean()), 4),
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "wall_ms_per_image_epoch": round(1000 * wall / image_epochs, 2),
        "cpu_ms_per_image_epoch": round(1000 * cpu / image_epochs, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
