"""Throughput of adversarial-training steps relative to a clean step, RACL genotype network.

Times full training steps through :func:`rarn.robust.loop.train_epoch` (step function, backward,
clipping, SGD) for ``standard``, ``pgd`` (PGD-7, 8/255, 2/255), ``trades`` (7 KL steps, beta 6)
and ``fast`` (Fast-AT) at two shapes and the same batch size, interleaving the methods within
each trial so that machine-load drift hits them alike. Prints one JSON line: per method the
median step time and images/s (on a CPU from this process's CPU time, see ``timer``), the ratio
to the clean step, the same from wall time, and whether the goals hold (PGD-7 <= 6.0x, Fast-AT
<= 1.8x). Attack steps run with frozen weights (input gradients only), so PGD-k should cost
about (2k + 3) / 3 = 5.67 clean steps.

    python benchmarks/adv_train_step.py [--trials 5] [--steps 1] [--threads 1] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rarn import build_network, count_parameters, make_step, train_epoch

SHAPES = {
    "small": {"C": 8, "layers": 5, "side": 32, "batch": 32},
    "medium": {"C": 16, "layers": 8, "side": 32, "batch": 64},
}
GOALS = {"pgd": 6.0, "fast": 1.8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape(shape: dict, device: torch.device, trials: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_network("RACL", num_classes=10, C=shape["C"], layers=shape["layers"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    g = torch.Generator(device=device).manual_seed(0)
    B, side = shape["batch"], shape["side"]
    x = torch.rand(B, 3, side, side, generator=g, device=device)
    y = torch.randint(0, 10, (B,), generator=g, device=device)
    attack = {"eps": 8 / 255, "generator": g}
    step_fns = {
        "standard": make_step("standard"),
        "pgd": make_step("pgd", step_size=2 / 255, steps=7, **attack),
        "trades": make_step("trades", step_size=2 / 255, steps=7, beta=6.0, **attack),
        "fast": make_step("fast", **attack),
    }
    batches = [(x, y)] * steps
    for fn in step_fns.values():  # warm-up (allocator, kernels, first-call overheads)
        train_epoch(model, batches[:1], fn, opt)
    wall: dict[str, list[float]] = {name: [] for name in step_fns}
    cpu: dict[str, list[float]] = {name: [] for name in step_fns}
    for _ in range(trials):
        for name, fn in step_fns.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            train_epoch(model, batches, fn, opt)
            _sync(device)
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    # On a CPU the ratios use this process's CPU time: other processes on a shared machine
    # stretch wall time (by 2x and more here) but not the CPU time of a 1-thread process.
    # On a GPU, wall time (synchronised) is the measure.
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    basis = med_cpu if device.type == "cpu" else med_wall
    return {
        "config": shape | {"params": count_parameters(model)},
        "step_s": {k: round(v, 4) for k, v in basis.items()},
        "images_per_s": {k: round(B / v, 1) for k, v in basis.items()},
        "ratio_to_clean": {k: round(v / basis["standard"], 2) for k, v in basis.items()},
        "wall_step_s": {k: round(v, 4) for k, v in med_wall.items()},
        "wall_ratio_to_clean": {k: round(v / med_wall["standard"], 2) for k, v in med_wall.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=5, help="interleaved trials (median)")
    ap.add_argument("--steps", type=int, default=1, help="training steps timed per trial")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--smoke", action="store_true", help="one trial of one step, small only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = {"small": SHAPES["small"]} if args.smoke else SHAPES
    trials, steps = (1, 1) if args.smoke else (args.trials, args.steps)
    results = {name: bench_shape(s, device, trials, steps) for name, s in shapes.items()}
    goals = {
        f"{name}.{method}<={limit}x": r["ratio_to_clean"][method] <= limit
        for name, r in results.items()
        for method, limit in GOALS.items()
    }
    out = {
        "benchmark": "adv_train_step",
        "device": str(device),
        "timer": "process_time" if device.type == "cpu" else "wall",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "trials": trials,
        "steps_per_trial": steps,
        "shapes": results,
        "goals_met": goals,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
