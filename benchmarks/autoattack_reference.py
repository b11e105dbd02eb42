"""AutoAttack two ways on the same models: rarn's ``autoattack_torchattacks`` (torchattacks'
components) and the reference implementation of Croce and Hein (PyPI ``pyautoattack`` 0.2.0,
rarn's default ``autoattack`` since issue 17).

Standard version (APGD-CE, APGD-T, FAB-T, Square; 100 iterations, 5,000 queries) at L-inf eps
0.1 on the first ``--n`` test images of sklearn's 8x8 digits, for a small CNN (the tests'
``digits`` net) and the same CNN behind a shattering input quantisation (``net(round(2x) / 2)``,
the masked model of docs/evaluation.md). Prints one JSON line: clean and robust accuracy, a hash
of the set of robust images, the process CPU time, and the reference's checks (what it logs as
warnings), per model x implementation x seed.

    pip install --no-deps pyautoattack==0.2.0   # or put it on PYTHONPATH
    python benchmarks/autoattack_reference.py [--n 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from rarn import get_attack


def _digits_net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The tests' digits CNN (tests/conftest.py: train_digits_net), 8 epochs of Adam."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(8):
        order = torch.randperm(1300, generator=g)
        for i in range(0, 1300, 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), x[1300:], y[1300:]


class _Quantized(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 2) / 2)


class _Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _torchattacks(model, x, y, eps, seed):
    g = torch.Generator().manual_seed(seed)
    t = time.process_time()
    attack = get_attack("autoattack_torchattacks")
    x_adv = attack(model, x, y, eps=eps, step_size=1.0, steps=1, generator=g)
    return x_adv, time.process_time() - t, []


def _reference(model, x, y, eps, seed):
    import pyautoattack

    handler, logger = _Logged(), logging.getLogger("auto-attack")
    logger.addHandler(handler)
    try:
        with torch.random.fork_rng(devices=[]):  # it re-seeds the global RNG
            aa = pyautoattack.AutoAttack(model, eps=eps, seed=seed, device="cpu")
            t = time.process_time()
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=500)
            dt = time.process_time() - t
    finally:
        logger.removeHandler(handler)
    return x_adv, dt, sorted({re.split(r"!|\. ", m)[0] for m in handler.messages})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="test images")
    p.add_argument("--eps", type=float, default=0.1)
    args = p.parse_args()
    torch.set_num_threads(1)
    net, x, y = _digits_net()
    x, y = x[: args.n], y[: args.n]
    out = {}
    for name, model in (("digits-cnn", net), ("quantize", _Quantized(net).eval())):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        for impl, run in (("torchattacks", _torchattacks), ("pyautoattack", _reference)):
            for seed in (0, 1):
                x_adv, dt, checks = run(model, x, y, args.eps, seed)
                with torch.no_grad():
                    robust = clean & (model(x_adv).argmax(1) == y)
                which = robust.nonzero().flatten().tolist()
                out[f"{name}/{impl}/seed{seed}"] = {
                    "clean": round(float(clean.float().mean()), 4),
                    "robust": round(float(robust.float().mean()), 4),
                    "robust_set_sha": hashlib.sha256(str(which).encode()).hexdigest()[:12],
                    "cpu_s": round(dt, 1),
                    "checks": checks,
                }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
