"""Lazy regularisation of the gradient-norm term: its effect on the trained weights, over seeds.

The evidence for or against ``search.grad_norm_every = 2`` as the default (issue 20, item 3).
The supernet's weights alone are trained (architecture frozen at its initial median, C=8,
5 cells, batch 32, plain SGD of :meth:`rarn.nas.search.RACLSearch.weight_step`) for ``--epochs``
epochs, with the term off (gamma = 0), on every step (gamma = 0.1) and on every 2nd step at
2 gamma; then on held-out images: the mean input-gradient norm ``||grad_x CE||``, clean accuracy
and FGSM accuracy at ``--eps``. A seed fixes the initial weights and the batch order, the same
for every schedule, so schedules compare per seed (``paired``: the mean difference to
``every_step`` over seeds with a 95 % t interval).

Data (``--data``):

* ``digits``: scikit-learn's digits (8x8, 1,437 training and 360 held-out images), FGSM at 0.1;
* ``cifar-npz``: the shared ``cifar10_subset.npz`` (JPEG-degraded CIFAR-10 test images: not
  CIFAR-10 figures), the first ``--train`` images to train and the next ``--held-out`` to
  measure (disjoint), average-pooled to ``--side`` pixels; FGSM at 2/255 and 8/255.

Prints one JSON line: per schedule, mean and standard deviation over seeds, the per-seed values
and the CPU seconds of training; ``paired`` as above.

    python benchmarks/lazy_gradnorm.py [--seeds 0,1,2,3,4,5,6,7] [--epochs 3] [--threads 1]
        [--schedules off,every_step,every_2nd] [--data digits|cifar-npz] [--path NPZ]
        [--train 4000] [--held-out 2000] [--side 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats

from rarn import ConstraintConfig, RACLSearch, SearchConfig
from rarn.data.npz import read_npz

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


def cifar_npz(path: Path, n_train: int, n_held: int, side: int) -> tuple[torch.Tensor, ...]:
    """The first ``n_train`` images and the next ``n_held`` of an ``.npz`` with uint8 NHWC ``x``
    and integer ``y``, in [0, 1], average-pooled to ``side`` pixels."""
    arrays = read_npz(path, path.read_bytes(), ("x", "y"))
    n = n_train + n_held
    if n > len(arrays["y"]):
        raise SystemExit(f"--train + --held-out = {n} > the {len(arrays['y'])} images of {path}")
    x = torch.from_numpy(arrays["x"][:n].copy()).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != side:
        x = F.adaptive_avg_pool2d(x, side)
    y = torch.from_numpy(arrays["y"][:n].copy()).long()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def held_out(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: list[float], batch: int = 500
) -> dict:
    model.eval()
    gnorm, clean, fgsm = [], [], {e: [] for e in eps}
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        xg = xb.clone().requires_grad_(True)
        per = F.cross_entropy(model(xg), yb, reduction="none")
        (gx,) = torch.autograd.grad(per.sum(), xg)
        gnorm.append(gx.flatten(1).norm(dim=1))
        with torch.no_grad():
            clean.append(model(xb).argmax(1) == yb)
            for e in eps:
                fgsm[e].append(model((xb + e * gx.sign()).clamp(0, 1)).argmax(1) == yb)
    out = {
        "grad_norm": float(torch.cat(gnorm).mean()),
        "clean": float(torch.cat(clean).float().mean()),
    }
    for e in eps:
        out[_fgsm_key(e, eps)] = float(torch.cat(fgsm[e]).float().mean())
    return out


def _fgsm_key(e: float, eps: list[float]) -> str:
    return "fgsm" if len(eps) == 1 else f"fgsm_{e:.4f}"


def _paired(runs: dict[str, list[dict]], metrics: list[str]) -> dict:
    """Per schedule and metric: mean difference to ``every_step`` over seeds, 95 % t interval."""
    if "every_step" not in runs or len(runs["every_step"]) < 2:
        return {}
    base = runs["every_step"]
    out = {}
    for k, rs in runs.items():
        if k == "every_step":
            continue
        out[f"{k}_minus_every_step"] = {}
        for m in metrics:
            diff = [r[m] - b[m] for r, b in zip(rs, base)]
            mean, sd = statistics.mean(diff), statistics.stdev(diff)
            half = float(stats.t.ppf(0.975, len(diff) - 1)) * sd / len(diff) ** 0.5
            out[f"{k}_minus_every_step"][m] = {
                "mean": round(mean, 4),
                "ci95": [round(mean - half, 4), round(mean + half, 4)],
            }
    return out


def train(schedule: str, seed: int, epochs: int, data: tuple, eps: list[float]) -> dict:
    gamma, every = SCHEDULES[schedule]
    xt, yt, xv, yv = data
    cfg = SearchConfig(
        init_channels=8, layers=5, batch_size=32, sampling=False, grad_norm_weight=gamma,
        grad_norm_every=every, epochs=epochs, seed=seed,
    )  # fmt: skip
    torch.manual_seed(seed)
    s = RACLSearch(cfg, ConstraintConfig(enabled=False), num_classes=10, in_channels=xt.shape[1])
    g = torch.Generator().manual_seed(seed)
    c0, step = time.process_time(), 0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt) - 31, 32):
            idx = perm[i : i + 32]
            s.weight_step(xt[idx], yt[idx], penalty=gamma > 0 and step % every == 0)
            step += 1
        s.w_sched.step()
    out = held_out(s.model, xv, yv, eps)
    out["train_cpu_s"] = round(time.process_time() - c0, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list")
    p.add_argument("--data", choices=("digits", "cifar-npz"), default="digits")
    p.add_argument("--path", type=Path, default=Path("../shared/data/cifar10_subset.npz"))
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--side", type=int, default=16)
    args = p.parse_args()
    unknown = set(args.schedules.split(",")) - set(SCHEDULES)
    if unknown:
        p.error(f"unknown schedule(s) {sorted(unknown)}; known: {', '.join(SCHEDULES)}")
    torch.set_num_threads(args.threads)
    if args.data == "digits":
        data, eps = digits(), [0.1]
    else:
        if not args.path.is_file():
            p.error(f"--path {args.path}: no such file (the shared cifar10_subset.npz)")
        data, eps = cifar_npz(args.path, args.train, args.held_out, args.side), [2 / 255, 8 / 255]
    seeds = [int(v) for v in args.seeds.split(",")]
    load0 = [round(v, 2) for v in os.getloadavg()]
    names = args.schedules.split(",")
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for seed in seeds:  # seed-major: an interrupted study still pairs every schedule it has
        for k in names:
            runs[k].append(train(k, seed, args.epochs, data, eps))
            print(f"seed {seed} {k}: {runs[k][-1]}", file=sys.stderr, flush=True)
    metrics = ["grad_norm", "clean", *(_fgsm_key(e, eps) for e in eps)]
    summary = {}
    for k, rs in runs.items():
        summary[k] = {
            m: {
                "mean": round(statistics.mean(r[m] for r in rs), 4),
                "std": round(statistics.stdev(r[m] for r in rs), 4) if len(rs) > 1 else 0.0,
                "per_seed": [round(r[m], 4) for r in rs],
            }
            for m in (*metrics, "train_cpu_s")
        }
    print(json.dumps({
        "benchmark": "lazy_gradnorm", "data": args.data, "seeds": seeds, "epochs": args.epochs,
        "threads": args.threads, "schedules": summary, "paired": _paired(runs, metrics),
        "loadavg_start": load0,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
