"""Adapters for torchattacks (optional): its reference PGD and the standard AutoAttack.

``torchattacks`` is imported inside each function, never at module import, so that ``rarn``
imports without it. torchattacks draws from (and re-seeds) torch's global RNG; every call runs
under a forked RNG seeded from the caller's generator, so it is deterministic and leaves the
global state untouched. Inputs are handed over contiguous: torchattacks' FAB reshapes them (and
their gradients, whose layout follows the input's) with ``.view``, which fails on channels-last
strides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rarn.robust.attacks.interface import Budget, uniform_attack

__all__ = ["AUTOATTACK_VERSIONS", "autoattack", "pgd_torchattacks"]

AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard",)
"""AutoAttack compositions assembled here (the config's ``version`` choices)."""


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


@contextlib.contextmanager
def _isolated_global_rng(x: Tensor, seed: int) -> Iterator[None]:
    """torchattacks draws from (and re-seeds) torch's global RNG; keep that from leaking."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


@uniform_attack
def pgd_torchattacks(model: nn.Module, x: Tensor, y: Tensor, b: Budget) -> Tensor:
    r"""torchattacks' ``PGD`` (Madry et al. 2018, [https://arxiv.org/abs/1706.06083]) behind the
    uniform interface: the reference our :func:`~rarn.robust.attacks.pgd` is tested against.

    Distance measure: L-inf; ``step_size`` is torchattacks' ``alpha``. Requires ``torchattacks``
    (imported here, not at module import). The random start uses torch's global RNG, so it runs
    under a forked RNG seeded from ``generator``: deterministic, and the caller's global RNG
    state is left untouched.

    Example:
        >>> x_adv = pgd_torchattacks(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20)
    """
    import torchattacks

    atk = torchattacks.PGD(model, eps=b.eps, alpha=b.step_size, steps=b.steps, random_start=True)
    with _isolated_global_rng(x, _seed_from(b.generator)):
        return atk(x.contiguous(), y).to(dtype=x.dtype, device=x.device)


@uniform_attack
def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    b: Budget,
    *,
    n_iter: int = 100,
    n_queries: int = 5000,
    version: str = "standard",
) -> Tensor:
    r"""AutoAttack, standard version, from 'Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690] (Croce and
    Hein, ICML 2020), run with torchattacks' components.

    Distance measure: L-inf (e.g. eps 8/255). APGD-CE, APGD-T (9 target classes), FAB-T (9
    target classes) and Square (``n_queries``, standard: 5000, with the reference's fixed
    ``p`` schedule, ``resc_schedule=False``), one restart each, every attack only on the points
    the earlier ones did not fool (torchattacks' ``MultiAttack``). ``version`` is recorded in
    results and must be "standard" (the only composition assembled here). NB:
    torchattacks' own ``AutoAttack(version='standard')`` leaves APGD/FAB at 10 iterations; the
    reference standard version uses 100, so the components are assembled here with ``n_iter=100``
    by default. ``step_size`` is ignored (APGD adapts its step size) and so is ``steps`` (see
    ``n_iter``), so a suite-wide PGD step count cannot weaken it. Requires ``torchattacks``
    (imported here). torchattacks re-seeds torch's global RNG; it runs under a forked RNG seeded
    from ``generator``.

    Example:
        >>> x_adv = autoattack(model, x, y, eps=8 / 255, step_size=1.0, steps=1)
    """
    import torchattacks as ta

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"autoattack: only version 'standard' is implemented, got {version!r}")
    x = x.contiguous()  # FAB's .view calls fail on channels-last strides
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    k = min(n_classes, 10)  # torchattacks targets the top (k - 1) classes: 9, as the reference
    seed = _seed_from(b.generator)
    common = {"norm": "Linf", "eps": b.eps, "seed": seed, "n_restarts": 1}
    atk = ta.MultiAttack(
        [
            ta.APGD(model, steps=n_iter, loss="ce", **common),
            ta.APGDT(model, steps=n_iter, n_classes=k, **common),
            ta.FAB(model, steps=n_iter, multi_targeted=True, n_classes=k, **common),
            ta.Square(model, n_queries=n_queries, resc_schedule=False, **common),  # reference
        ]
    )
    with _isolated_global_rng(x, seed):
        return atk(x, y).to(dtype=x.dtype, device=x.device)
