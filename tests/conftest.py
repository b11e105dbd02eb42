"""Shared fixtures. Ray's environment must be set before ``ray`` is imported (ENV.md §9)."""

from __future__ import annotations

import os

from pipeline.env import apply_env_defaults

# Loopback-only and quiet, plus the test settings; workers inherit the driver's environment.
apply_env_defaults(testing=True)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# Tiny models are dominated by per-op overhead: one intra-op thread is faster for them, and on a
# shared 2-core machine two threads contend badly (10-50x slower measured under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """One 2-CPU Ray instance on loopback for the whole test session."""
    import logging

    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()


def _proc_starttime(pid: int) -> str | None:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Reaper:
    """Processes a test started, recorded by PID (with start time, so a reused PID is spared)."""

    def __init__(self) -> None:
        self.recorded: dict[int, str] = {}

    def track_tree(self, pid: int) -> list[int]:
        """Record ``pid`` and all its current descendants; returns their PIDs."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [pid], [pid]
        while todo:
            kids = children.get(todo.pop(), [])
            tree += kids
            todo += kids
        for p in tree:
            start = _proc_starttime(p)
            if start is not None:
                self.recorded.setdefault(p, start)
        return tree

    def kill_all(self) -> None:
        import signal

        for pid, start in self.recorded.items():
            if _proc_starttime(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.recorded.clear()


@pytest.fixture
def reaper():
    """Kills every process recorded with ``reaper.track_tree(pid)`` at teardown."""
    r = Reaper()
    yield r
    r.kill_all()


def train_digits_net(seed: int = 0, epochs: int = 8):
    """A small conv net on sklearn's 8x8 digits (1 channel, x in [0, 1]); ~97 % test accuracy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        order = torch.randperm(1300, generator=g)
        for i in range(0, 1300, 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), x[1300:], y[1300:]


@pytest.fixture(scope="session")
def digits_net_trainer():
    """``train_digits_net(seed=0, epochs=8) -> (model, x_test, y_test)`` for attack tests."""
    return train_digits_net
