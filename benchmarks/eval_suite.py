"""Cost of the evaluation suite per image: FGSM, PGD-20, MIM-20, CW-20 and standard AutoAttack.

The suite is the one of ``configs/cifar10.yaml`` in its named form (``evaluation.attacks`` and
``evaluation.suite``, resolved by ``rarn.robust.evaluation.named_suite``); AutoAttack there runs
on the first ``n`` of the 10,000 test images, so its cost per image of the suite is its cost per
attacked image times ``n / 10,000`` (``--test-size``); ``--aa-iters`` / ``--aa-queries`` cut its
budget for a quick run, and the standard budget's cost is then scaled by forward passes.

Times each attack of the suite on the RACL genotype network at a small shape (CPU by default),
two ways: every attack alone on all images (``per_attack``, today's default suite without
AutoAttack), and each attack only on the images no earlier attack fooled (``survivors``, the
way AutoAttack's reference runs its components; AutoAttack last). The labels are the network's
own predictions, so every image starts clean-correct and is attacked. Prints one JSON line:
images/s of each attack alone, the time of the whole suite per 1,000 images (today's four
attacks; with AutoAttack on every image, per attack and survivors; with AutoAttack on the
config's subset, as the pipeline runs it), AutoAttack's share, the survivors after each attack,
and the issue-9 goal (the suite with AutoAttack at most 3x today's suite per image).

An untrained network is fooled by every attack at once, which would leave AutoAttack nothing to
do in survivors mode. So a fraction ``--robust`` of the images (default 0.5, about the PGD-20
robust accuracy of adversarially trained CIFAR-10 models at 8/255) carries a mark (first pixel
1) that adds 100 to the class-0 logit, which no attack within eps < 0.5 can undo: stand-ins for a
robust model's robust images, on which every attack pays its full per-image cost (the network's
forward and backward passes are the same). On a CPU the times are this process's CPU time
(other processes on a shared machine stretch wall time, not the CPU time of a 1-thread process).

``--suite`` times instead the config's suite as the pipeline runs it (``evaluate_robustness``,
per attack, no checks, no curve), twice on the same model and images: AutoAttack with
``survivors`` (its default: only the images no earlier attack fooled) and with ``survivors:
false`` (every clean-correct image of its subset); one JSON line with both times, both
worst-case accuracies (equal, up to AutoAttack's draws) and the images AutoAttack saw.

    python benchmarks/eval_suite.py [--n 16] [--side 16] [--threads 1] [--robust 0.5]
        [--aa-iters 100] [--aa-queries 5000] [--config configs/cifar10.yaml] [--test-size 10000]
        [--suite]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch
from torch import Tensor, nn

from rarn import (
    NamedAttack,
    build_network,
    count_parameters,
    eval_mode,
    evaluate_robustness,
    get_attack,
    load_config,
    named_suite,
)
from rarn.robust.evaluation.named import config_suite


def _suite(args: argparse.Namespace) -> tuple[list[NamedAttack], int]:
    """The config's suite at the spec's step rule (20 steps of eps / 4); AutoAttack's subset n."""
    ev = load_config(args.config).evaluation
    entries, _ = config_suite(ev)
    shared = {"eps": args.eps, "step_size": args.eps / 4, "steps": 20}
    named = list(named_suite(entries, shared))
    aa = next(a for a in named if a.attack == "autoattack")
    budget = {"n_iter": args.aa_iters, "n_queries": args.aa_queries}
    named[named.index(aa)] = dataclasses.replace(aa, params={**aa.params, **budget})
    return named, aa.n


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


def _attack(model, name, x, y, mask, params, g, device) -> tuple[torch.Tensor, float]:
    """Attack the images where ``mask`` holds; return where they survive and the seconds taken."""
    t0 = _clock(device)
    out = mask.clone()
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x_adv = get_attack(name)(model, x[idx], y[idx], generator=g, **params)
        with torch.no_grad():
            out[idx] = model(x_adv).argmax(1) == y[idx]
    return out, _clock(device) - t0


def _setup(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, Tensor, Tensor, Any, Any]:
    """The network, the marked model, the images and their labels, the generator, the device;
    one PGD step already run (first-call overheads out of the timings)."""
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
    two = torch.ones(2, dtype=torch.bool, device=device)
    warm_up = {"eps": 0.03, "step_size": 0.01, "steps": 1}
    with eval_mode(model):  # the labels' batch-norm statistics, kept
        _attack(model, "pgd", x[:2], y[:2], two, warm_up, g, device)
    return net, model, x, y, g, device


def run_suite(args: argparse.Namespace) -> dict:
    """``--suite``: the config's suite as the pipeline runs it (``evaluate_robustness``, per
    attack; no checks, no curve), twice on the same model and images: AutoAttack on the images
    no earlier attack fooled (``survivors``, its default) and on every image of its subset."""
    _, model, x, y, _, device = _setup(args)
    suite, aa_n = _suite(args)
    aa = next(a.name for a in suite if a.attack == "autoattack")
    main = next(a.name for a in suite if a.attack == "pgd")
    budget = {"eps": args.eps, "step_size": args.eps / 4, "steps": 20, "batch_size": args.n}
    out: dict[str, Any] = {}
    for label, on in (("survivors", True), ("every_image", False)):
        entries = [dataclasses.replace(a, survivors=on) if a.name == aa else a for a in suite]
        g = torch.Generator(device=device).manual_seed(0)
        t0 = _clock(device)
        r = evaluate_robustness(model, (x, y), attacks=entries, main_attack=main, checks=False,
                                eps_curve=(), generator=g, **budget)  # fmt: skip
        out[label] = {
            "s": round(_clock(device) - t0, 2),
            "worst_case_accuracy": r.worst_case_accuracy,
            "autoattack_accuracy": r.robust_accuracy[aa],
            "autoattack_images": int(r.attacked[aa].sum()),
        }
    return {
        "benchmark": "eval_suite_survivors",
        "config": {
            "suite_config": args.config,
            "n": args.n,
            "side": args.side,
            "robust": args.robust,
            "autoattack_n": aa_n,
            "aa_iters": args.aa_iters,
            "aa_queries": args.aa_queries,
            "threads": args.threads,
            "device": str(device),
        },
        **out,
        "speedup": round(out["every_image"]["s"] / max(out["survivors"]["s"], 1e-9), 2),
        "same_worst_case": out["survivors"]["worst_case_accuracy"]
        == out["every_image"]["worst_case_accuracy"],
    }


def run(args: argparse.Namespace) -> dict:
    net, model, x, y, g, device = _setup(args)
    suite, aa_n = _suite(args)
    everyone = torch.ones(args.n, dtype=torch.bool, device=device)
    alone, in_turn, survivors = {}, {}, {}
    for a in suite:
        _, alone[a.name] = _attack(model, a.attack, x, y, everyone, a.params, g, device)
    mask = everyone
    for a in suite:
        mask, in_turn[a.name] = _attack(model, a.attack, x, y, mask, a.params, g, device)
        survivors[a.name] = int(mask.sum())
    aa = next(a.name for a in suite if a.attack == "autoattack")
    scale = _standard_over_cut(args)
    aa_alone = alone[aa] * scale  # at the standard budget
    today = sum(t for a, t in alone.items() if a != aa)
    fraction = min(aa_n / args.test_size, 1.0) if aa_n else 1.0
    per_1000 = {
        "today_per_attack_without_autoattack": today,
        "per_attack_autoattack_every_image": today + aa_alone,
        "survivors_autoattack_every_image": sum(in_turn.values()) + in_turn[aa] * (scale - 1),
        "per_attack_autoattack_subset": today + aa_alone * fraction,
    }
    per_1000 = {k: round(v / args.n * 1000, 1) for k, v in per_1000.items()}
    ratio = (
        per_1000["per_attack_autoattack_subset"] / per_1000["today_per_attack_without_autoattack"]
    )
    every = (
        per_1000["per_attack_autoattack_every_image"]
        / per_1000["today_per_attack_without_autoattack"]
    )
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
            "suite_config": args.config,
            "suite": {
                a.name: {k: v for k, v in a.params.items() if k != "step_size"} for a in suite
            },
            "autoattack_subset": {"n": aa_n, "of": args.test_size, "fraction": fraction},
            "autoattack_budget_scale": round(scale, 2),
            "clock": "cpu process time" if device.type == "cpu" else "wall (synchronised)",
        },
        "images_per_s_alone": {k: round(args.n / v, 3) for k, v in alone.items()},
        "survivors_after": survivors,
        "suite_s_per_1000_images": per_1000,
        "autoattack_share": {
            "every_image": round(aa_alone / (today + aa_alone), 3),
            "subset": round(aa_alone * fraction / (today + aa_alone * fraction), 3),
        },
        "suite_with_autoattack_every_image_vs_today": round(every, 2),
        "suite_with_autoattack_subset_vs_today": round(ratio, 2),
        "goal_at_most_3x": ratio <= 3.0,
    }


def _standard_over_cut(args: argparse.Namespace) -> float:
    """Forward passes of standard AutoAttack over those of the run budget, per robust image.

    A backward pass counts as two forwards: APGD-CE ``n_iter`` gradient steps, APGD-T and FAB-T
    9 targets x ``n_iter`` each, Square ``n_queries`` forwards.
    """

    def passes(n_iter: int, n_queries: int) -> float:
        return 3 * n_iter * (1 + 9 + 9) + n_queries

    return passes(100, 5000) / passes(args.aa_iters, args.aa_queries)


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
    p.add_argument("--config", default="configs/cifar10.yaml", help="the suite's config")
    p.add_argument("--test-size", type=int, default=10_000, help="test images of that config")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--suite",
        action="store_true",
        help="time the config's suite with AutoAttack on the survivors vs on every image",
    )
    args = p.parse_args()
    print(json.dumps(run_suite(args) if args.suite else run(args)))


if __name__ == "__main__":
    main()
