"""Lazy regularisation of the gradient-norm term: its effect on the trained weights, over seeds.

The evidence for or against ``search.grad_norm_every = 2`` as the default (issue 20, item 3).
The supernet's weights alone are trained (architecture frozen at its initial median, C=8,
5 cells, batch 32, plain SGD of :meth:`rarn.nas.search.RACLSearch.weight_step`) on scikit-learn's
digits (8x8, 1,437 training and 360 held-out images) for ``--epochs`` epochs, with the term off
(gamma = 0), on every step (gamma = 0.1) and on every 2nd step at 2 gamma; then on the held-out
images: the mean input-gradient norm ``||grad_x CE||``, clean accuracy and FGSM accuracy at
``eps = 0.1``. Prints one JSON line: per schedule, mean and standard deviation over seeds, the
per-seed values and the CPU seconds of training.

    python benchmarks/lazy_gradnorm.py [--seeds 0,1,2,3,4,5,6,7] [--epochs 3] [--threads 1]
        [--schedules off,every_step,every_2nd]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from rarn import ConstraintConfig, RACLSearch, SearchConfig

SCHEDULES = {"off": (0.0, 1), "every_step": (0.1, 1), "every_2nd": (0.1, 2)}


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = len(y) * 4 // 5
    return x[:n], y[:n], x[n:], y[n:]


def held_out(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict:
    model.eval()
    xg = x.clone().requires_grad_(True)
    per = F.cross_entropy(model(xg), y, reduction="none")
    (gx,) = torch.autograd.grad(per.sum(), xg)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        adv = (x + eps * gx.sign()).clamp(0, 1)
        fgsm = float((model(adv).argmax(1) == y).float().mean())
    return {"grad_norm": float(gx.flatten(1).norm(dim=1).mean()), "clean": clean, "fgsm": fgsm}


def train(schedule: str, seed: int, epochs: int, data: tuple) -> dict:
    gamma, every = SCHEDULES[schedule]
    xt, yt, xv, yv = data
    cfg = SearchConfig(
        init_channels=8, layers=5, batch_size=32, sampling=False, grad_norm_weight=gamma,
        grad_norm_every=every, epochs=epochs, seed=seed,
    )  # fmt: skip
    torch.manual_seed(seed)
    s = RACLSearch(cfg, ConstraintConfig(enabled=False), num_classes=10, in_channels=1)
    g = torch.Generator().manual_seed(seed)
    c0, step = time.process_time(), 0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt) - 31, 32):
            idx = perm[i : i + 32]
            s.weight_step(xt[idx], yt[idx], penalty=gamma > 0 and step % every == 0)
            step += 1
        s.w_sched.step()
    out = held_out(s.model, xv, yv, 0.1)
    out["train_cpu_s"] = round(time.process_time() - c0, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = digits()
    seeds = [int(v) for v in args.seeds.split(",")]
    load0 = [round(v, 2) for v in os.getloadavg()]
    names = args.schedules.split(",")
    runs = {k: [train(k, seed, args.epochs, data) for seed in seeds] for k in names}
    summary = {}
    for k, rs in runs.items():
        summary[k] = {
            m: {
                "mean": round(statistics.mean(r[m] for r in rs), 4),
                "std": round(statistics.stdev(r[m] for r in rs), 4) if len(rs) > 1 else 0.0,
                "per_seed": [round(r[m], 4) for r in rs],
            }
            for m in ("grad_norm", "clean", "fgsm", "train_cpu_s")
        }
    print(json.dumps({
        "benchmark": "lazy_gradnorm", "seeds": seeds, "epochs": args.epochs,
        "threads": args.threads, "schedules": summary, "loadavg_start": load0,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
