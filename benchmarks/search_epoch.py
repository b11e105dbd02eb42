"""One timed epoch of the CIFAR-10 search and the projected wall time of the 50-epoch protocol.

Builds the search of ``--config`` (default ``configs/cifar10.yaml``: C=16, 8 cells, batch 128,
RACL with the finite-difference gradient-norm term and the chance constraint) plus dotted
overrides, and times one epoch of :func:`rarn.nas.loop.run_search` *with* architecture steps
(``warmup_epochs=0``): weight and architecture steps over D_T / D_V, the D_V evaluation, decoding
and the collapse report, i.e. everything a logged epoch costs. A throwaway search first runs
``--warmup-steps`` iterations, so that CUDA initialisation and cuDNN's autotuning (one search per
shape, process-wide) stay out of the timing.

Projection: ``epoch time x (full D_T steps / timed steps) x epochs`` where the full epoch is the
paper's (50,000 CIFAR-10 training images, ``data.train_portion`` of them in D_T, batch
``search.batch_size``): exact for real CIFAR-10, a per-step extrapolation for the shared subset
(``data.name=cifar10-npz``; evaluation and decoding scale alike with the data). The 15 warm-up
epochs of the protocol skip the architecture step, so the projection is an upper bound. Goal:
under 0.1 GPU-day on one H100-class GPU (the paper: about 0.5 GPU-day).

Modes: ``fp32`` (float32, the reference) and ``bf16`` (``search.bf16`` and
``search.channels_last``; bf16 is a no-op on CPU). Prints one JSON line.

    python benchmarks/search_epoch.py [--device cuda] [--modes fp32,bf16] [--max-steps N]
        [--config configs/cifar10.yaml] [KEY=VALUE ...]
    python benchmarks/search_epoch.py --smoke     # CPU, tiny shape, 2 steps: seconds
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from rarn import Config, RACLSearch, SearchData, load_config, load_dataset, make_loader, run_search

CIFAR10_TRAIN = 50_000
GOAL_GPU_DAYS, PAPER_GPU_DAYS = 0.1, 0.5
SMOKE = (
    "search.init_channels=8",
    "search.layers=5",
    "search.batch_size=16",
    "data.name=digits",
    "data.limit=128",
    "search.decode_samples=10",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(cfg: Config, data: SearchData, device: torch.device, steps: int) -> None:
    """A few iterations of a throwaway search of the same shapes (CUDA context, allocator,
    cuDNN autotuning)."""
    if steps == 0:
        return
    s = RACLSearch(
        cfg.search,
        cfg.constraint,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        device=device,
    )
    loader = make_loader(data.train, cfg.search.batch_size, shuffle=False, drop_last=True)
    for _, (x, y) in zip(range(steps), loader):
        s.arch_step(x, y)
        s.weight_step(x, y)
    _sync(device)


def time_epoch(cfg: Config, data: SearchData, device: torch.device, warmup: int) -> dict:
    """One epoch with architecture steps: its logged ``epoch_time``, the steps it ran and the
    wall time of the whole call (construction, epoch, final decodings)."""
    _warm_up(cfg, data, device, warmup)
    t0 = time.perf_counter()
    result = run_search(cfg.search, cfg.constraint, data, device=device)
    _sync(device)
    wall = time.perf_counter() - t0
    m = result.final
    return {
        "epoch_s": round(m["epoch_time"], 3),
        "steps": int(m["arch_steps"]),
        "s_per_step": round(m["epoch_time"] / max(1, m["arch_steps"]), 4),
        "run_search_s": round(wall, 3),
        "train_loss": round(m["train_loss"], 4),
        "val_acc": round(m["val_acc"], 4),
    }


def project(timed: dict, cfg: Config, protocol_epochs: int) -> dict[str, Any]:
    """The paper's full epoch and ``protocol_epochs`` of them, from a timed epoch."""
    full_steps = int(CIFAR10_TRAIN * cfg.data.train_portion) // cfg.search.batch_size
    epoch_s = timed["epoch_s"] * full_steps / max(1, timed["steps"])
    total_s = epoch_s * protocol_epochs
    return {
        "full_epoch_steps": full_steps,
        "projected_epoch_s": round(epoch_s, 1),
        "projected_protocol_h": round(total_s / 3600, 3),
        "projected_gpu_days": round(total_s / 86400, 4),
        "goal_met": total_s / 86400 < GOAL_GPU_DAYS,
    }


def _config(args: argparse.Namespace, mode: str) -> Config:
    low = mode == "bf16"
    overrides = [
        *args.overrides,
        "search.epochs=1",
        "search.warmup_epochs=0",
        f"search.max_steps_per_epoch={args.max_steps}",
        f"search.bf16={str(low).lower()}",
        f"search.channels_last={str(low).lower()}",
    ]
    return load_config(args.config, overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cifar10.yaml")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--max-steps", type=int, default=0, help="steps of the epoch (0: all of D_T)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 2 steps (a test)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.limit=1000")
    args = p.parse_args()
    if args.smoke:
        args.device, args.max_steps, args.warmup_steps = "cpu", 2, 1
        args.overrides = [*SMOKE, *args.overrides]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"fp32", "bf16"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known: fp32, bf16")
    base = _config(args, modes[0])
    protocol_epochs = load_config(args.config).search.epochs  # the config's, before overrides
    bundle = load_dataset(base.data)
    data = SearchData.from_bundle(bundle, base.data.train_portion, base.data.seed)
    out: dict[str, Any] = {
        "benchmark": "search_epoch",
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "data": base.data.name,
        "d_t": len(data.train),
        "d_v": len(data.val),
        "shape": {
            k: getattr(base.search, k)
            for k in ("init_channels", "layers", "nodes", "batch_size", "partial_channels")
        },
        "grad_norm_mode": base.search.grad_norm_mode,
        "protocol_epochs": protocol_epochs,
        "modes": {},
    }
    for mode in modes:
        cfg = _config(args, mode)
        timed = time_epoch(cfg, data, device, args.warmup_steps)
        out["modes"][mode] = {**timed, **project(timed, cfg, protocol_epochs)}
    out["goal_gpu_days"], out["paper_gpu_days"] = GOAL_GPU_DAYS, PAPER_GPU_DAYS
    out["smoke"] = bool(args.smoke or args.max_steps)  # a partial epoch: a code check
    print(json.dumps(out))


if __name__ == "__main__":
    main()
