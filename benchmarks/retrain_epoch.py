"""Timed adversarial-retraining steps and the projected wall time of the retraining protocol.

Builds the retraining network of ``--config`` (default ``configs/cifar10.yaml``: the RACL
genotype, 20 cells, 36 channels, PGD-7 at 8/255, batch 128, bf16 + channels-last on CUDA) and
times ``--steps`` training steps (after ``--warmup-steps``) on random 32x32 batches, the training
step's cost being independent of the pixels. Projection: ``step time x ceil(50,000 x (1 -
retrain.val_fraction) / batch) x retrain.epochs`` per retrained network, without the per-epoch
validation (a PGD pass over the held-out tenth: a few per cent more). Prints one JSON line.

    python benchmarks/retrain_epoch.py [--device cuda] [--steps 20] [--config ...] [KEY=VALUE ...]
    python benchmarks/retrain_epoch.py --smoke     # CPU, tiny shape, 2 steps: seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from rarn import build_network, count_parameters, load_config, make_step, train_epoch
from rarn.robust.retrain import _step_kwargs

CIFAR10_TRAIN = 50_000
SMOKE = ["retrain.init_channels=8", "retrain.layers=3", "retrain.batch_size=8", "retrain.steps=2"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cifar10.yaml")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 2 steps (a test)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    if args.smoke:
        args.device, args.steps, args.warmup_steps = "cpu", 2, 1
        args.overrides = [*SMOKE, *args.overrides]
        torch.set_num_threads(1)  # tiny shapes: one thread is faster on a shared CPU
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rc = load_config(args.config, args.overrides).retrain
    torch.manual_seed(rc.seed)
    model = build_network(rc.genotype if rc.genotype != "searched" else "RACL", num_classes=10,
                          C=rc.init_channels, layers=rc.layers).to(device)  # fmt: skip
    cuda = device.type == "cuda"
    if rc.channels_last and cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=rc.lr, momentum=rc.momentum,
                          weight_decay=rc.weight_decay)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    step = make_step(rc.method, **_step_kwargs(rc, g))  # the retraining's own step
    x = torch.rand(rc.batch_size, 3, 32, 32, generator=g, device=device)
    y = torch.randint(0, 10, (rc.batch_size,), generator=g, device=device)
    bf16, channels_last = rc.bf16 and cuda, rc.channels_last and cuda
    kw = {"grad_clip": rc.grad_clip, "bf16": bf16, "channels_last": channels_last}
    train_epoch(model, [(x, y)] * args.warmup_steps, step, opt, **kw)
    _sync(device)
    t0 = time.perf_counter()
    train_epoch(model, [(x, y)] * args.steps, step, opt, **kw)
    _sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    steps_per_epoch = math.ceil(CIFAR10_TRAIN * (1 - rc.val_fraction) / rc.batch_size)
    total_s = step_s * steps_per_epoch * rc.epochs
    print(json.dumps({
        "benchmark": "retrain_epoch",
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "shape": {"init_channels": rc.init_channels, "layers": rc.layers,
                  "batch_size": rc.batch_size, "params": count_parameters(model)},
        "method": f"{rc.method}-{rc.steps}", "bf16": bf16, "channels_last": channels_last,
        "step_s": round(step_s, 4),
        "images_per_s": round(rc.batch_size / step_s, 1),
        "epochs": rc.epochs,
        "projected_epoch_s": round(step_s * steps_per_epoch, 1),
        "projected_retrain_h": round(total_s / 3600, 3),
        "smoke": bool(args.smoke),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
