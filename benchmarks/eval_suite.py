"""Cost of the evaluation suite per image: FGSM, PGD-20, MIM-20, CW-20 and standard AutoAttack.

Times each attack of the suite on the RACL genotype network at a small shape (CPU by default),
two ways: every attack alone on all images (``per_attack``, today's default suite without
AutoAttack), and each attack only on the images no earlier attack fooled (``survivors``, the
way AutoAttack's reference runs its components; AutoAttack last). The labels are the network's
own predictions, so every image starts clean-correct and is attacked. Prints one JSON line:
images/s of each attack alone, the time of the whole suite per 1,000 images in both modes,
AutoAttack's share of it, the survivors after each attack, and the issue-9 goal (the suite with
AutoAttack, survivors mode, at most 3x today's suite per image).

An untrained network is fooled by every attack at once, which would leave AutoAttack nothing to
do in survivors mode. So a fraction ``--robust`` of the images (default 0.5, about the PGD-20
robust accuracy of adversarially trained CIFAR-10 models at 8/255) carries a mark (first pixel
1) that adds 100 to the class-0 logit, which no attack within eps < 0.5 can undo: stand-ins for a
robust model's robust images, on which every attack pays its full per-image cost (the network's
forward and backward passes are the same). On a CPU the times are this process's CPU time
(other processes on a shared machine stretch wall time, not the CPU time of a 1-thread process).

    python benchmarks/eval_suite.py [--n 16] [--side 16] [--threads 1] [--robust 0.5]
        [--aa-iters 100] [--aa-queries 5000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor, nn

from rarn.models.common import eval_mode
from rarn.models.darts import build_network, count_parameters
from rarn.robust.attacks import get_attack


def _suite(args: argparse.Namespace) -> dict[str, dict]:
    """The spec's protocol: 20 steps of eps / 4 (2/255 at 8/255); standard AutoAttack."""
    pgd_like = {"step_size": args.eps / 4, "steps": 20}
    aa = {"step_size": 1.0, "steps": 1, "n_iter": args.aa_iters, "n_queries": args.aa_queries}
    return {
        "fgsm": {"step_size": args.eps, "steps": 1},
        "pgd": pgd_like,
        "mim": pgd_like,
        "cw": pgd_like,
        "autoattack": aa,
    }


class _Marked(nn.Module):
    """The network, plus 100 on the class-0 logit of images whose first pixel is above 0.5."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        bonus = torch.zeros_like(logits)
        bonus[:, 0] = 100.0 * (x[:, 0, 0, 0].detach() > 0.5).to(logits.dtype)
        return logits + bonus


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def _attack(model, name, x, y, mask, params, eps, g, device) -> tuple[torch.Tensor, float]:
    """Attack the images where ``mask`` holds; return where they survive and the seconds taken."""
    t0 = _clock(device)
    out = mask.clone()
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x_adv = get_attack(name)(model, x[idx], y[idx], eps=eps, generator=g, **params)
        with torch.no_grad():
            out[idx] = model(x_adv).argmax(1) == y[idx]
    return out, _clock(device) - t0


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build_network("RACL", num_classes=10, C=args.C, layers=args.layers)
    model = _Marked(net).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.n, 3, args.side, args.side, generator=g, device=device)
    x[:, 0, 0, 0] = (torch.arange(args.n, device=device) < round(args.robust * args.n)).float()
    with eval_mode(model), torch.no_grad():
        y = model(x).argmax(1)  # every image clean-correct: every attack has work to do
    suite = _suite(args)
    everyone = torch.ones(args.n, dtype=torch.bool, device=device)
    warm_up = {"step_size": 0.01, "steps": 1}  # first-call overheads out of the timings
    _attack(model, "pgd", x[:2], y[:2], everyone[:2], warm_up, 0.03, g, device)
    alone, in_turn, survivors = {}, {}, {}
    for name, params in suite.items():
        _, alone[name] = _attack(model, name, x, y, everyone, params, args.eps, g, device)
    mask = everyone
    for name, params in suite.items():
        mask, in_turn[name] = _attack(model, name, x, y, mask, params, args.eps, g, device)
        survivors[name] = int(mask.sum())
    today = sum(t for a, t in alone.items() if a != "autoattack")
    per_1000 = {
        "today_per_attack_without_autoattack": today,
        "per_attack": sum(alone.values()),
        "survivors": sum(in_turn.values()),
    }
    per_1000 = {k: round(v / args.n * 1000, 1) for k, v in per_1000.items()}
    ratio = per_1000["survivors"] / per_1000["today_per_attack_without_autoattack"]
    return {
        "benchmark": "eval_suite",
        "config": {
            "network": "RACL",
            "C": args.C,
            "layers": args.layers,
            "side": args.side,
            "n": args.n,
            "eps": args.eps,
            "robust": args.robust,
            "threads": args.threads,
            "device": str(device),
            "params": count_parameters(net),
            "suite": {
                k: {p: v for p, v in d.items() if p != "step_size"} for k, d in suite.items()
            },
            "clock": "cpu process time" if device.type == "cpu" else "wall (synchronised)",
        },
        "images_per_s_alone": {k: round(args.n / v, 2) for k, v in alone.items()},
        "survivors_after": survivors,
        "suite_s_per_1000_images": per_1000,
        "autoattack_share": {
            "per_attack": round(alone["autoattack"] / sum(alone.values()), 3),
            "survivors": round(in_turn["autoattack"] / sum(in_turn.values()), 3),
        },
        "suite_with_autoattack_vs_today": round(ratio, 2),
        "goal_at_most_3x": ratio <= 3.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="images")
    p.add_argument("--side", type=int, default=16, help="image side (16 or 32)")
    p.add_argument("--C", type=int, default=8, help="initial channels")
    p.add_argument("--layers", type=int, default=5, help="cells")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--eps", type=float, default=8 / 255, help="L-inf radius")
    p.add_argument("--robust", type=float, default=0.5, help="fraction of unfoolable images")
    p.add_argument("--aa-iters", type=int, default=100, help="AutoAttack APGD/FAB iterations")
    p.add_argument("--aa-queries", type=int, default=5000, help="AutoAttack Square queries")
    p.add_argument("--device", default="cpu")
    print(json.dumps(run(p.parse_args())))


if __name__ == "__main__":
    main()
