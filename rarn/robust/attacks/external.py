"""Adapters for external attack code: the reference AutoAttack, and torchattacks.

* :func:`autoattack` / :func:`autoattack_l2`: **the reference AutoAttack** of Croce and Hein
  (``pyautoattack`` on PyPI, their code), ``standard`` or ``rand`` version, L-inf or L2, run
  component by component on the survivors exactly as its ``run_standard_evaluation`` does, so
  that the component that broke each image is known (:func:`recording_components`).
* :func:`autoattack_torchattacks`: the standard version assembled from torchattacks' components
  (the earlier default, kept as an option), and :func:`pgd_torchattacks`.

The packages are imported inside each function, never at module import, so that ``rarn``
imports without them. Both draw from (and re-seed) torch's global RNG; every call runs under a
forked RNG seeded from the caller's generator, so it is deterministic and leaves the global state
untouched. Inputs are handed over contiguous: FAB reshapes them (and their gradients, whose
layout follows the input's) with ``.view``, which fails on channels-last strides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from rarn.robust.attacks.interface import Budget, uniform_attack

__all__ = [
    "AUTOATTACK_VERSIONS",
    "autoattack",
    "autoattack_l2",
    "autoattack_torchattacks",
    "pgd_torchattacks",
    "recording_components",
]

AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard", "rand")
"""AutoAttack versions (the config's ``version`` choices); torchattacks' assembly: standard only.
``rand`` (APGD-CE and APGD-DLR with 20 EOT iterations each) is for randomised models."""

_COMPONENTS: ContextVar[list[list[str | None]] | None] = ContextVar(
    "rarn_autoattack_components", default=None
)


@contextlib.contextmanager
def recording_components() -> Iterator[list[list[str | None]]]:
    """Inside the block, every reference AutoAttack call appends one list to the yielded list:
    per input image, the component that broke it (``"apgd-ce"``, ``"apgd-t"``, ``"fab-t"``,
    ``"square"``, ``"apgd-dlr"``) or None."""
    holder: list[list[str | None]] = []
    token = _COMPONENTS.set(holder)
    try:
        yield holder
    finally:
        _COMPONENTS.reset(token)


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


def _reference(
    model: nn.Module, x: Tensor, y: Tensor, b: Budget, norm: str, n_iter: int, n_queries: int,
    version: str,
) -> Tensor:  # fmt: skip
    from pyautoattack import AutoAttack

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(
            f"autoattack: version must be one of {AUTOATTACK_VERSIONS}, got {version!r}"
        )
    seed = _seed_from(b.generator)
    aa = AutoAttack(model, eps=b.eps, norm=norm, version=version, seed=seed, device=x.device)
    aa.verbose = False
    for part in (aa.apgd, aa.apgd_targeted, aa.fab):
        part.n_iter = n_iter
    aa.square.n_queries = n_queries
    x = x.contiguous()  # FAB's .view calls fail on channels-last strides
    x_adv, robust = x.clone(), torch.ones(len(y), dtype=torch.bool, device=x.device)
    broke: list[str | None] = [None] * len(y)
    with _isolated_global_rng(x, seed):
        for c in list(aa.attacks_to_run):  # the reference's loop, one component at a time
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            aa.attacks_to_run = [c]
            xa, ya = aa.run_standard_evaluation(x[idx], y[idx], batch_size=len(y))
            fooled = ya != y[idx]
            x_adv[idx[fooled]], robust[idx[fooled]] = xa[fooled].to(x.dtype), False
            for i in idx[fooled].tolist():
                broke[i] = c
    holder = _COMPONENTS.get()
    if holder is not None:
        holder.append(broke)
    return x_adv


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
    r"""The reference AutoAttack from 'Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690] (Croce and
    Hein, ICML 2020): their code, ``pyautoattack`` on PyPI.

    Distance measure: L-inf (e.g. eps 8/255). ``version="standard"``: APGD-CE, APGD-T (9 target
    classes), FAB-T (9 target classes), Square (``n_queries``, 5,000), one restart each, each
    component only on the points the earlier ones did not fool; ``"rand"`` (randomised models):
    APGD-CE and APGD-DLR with 20 EOT iterations. ``n_iter`` (100) is the APGD/FAB iterations.
    The components run one at a time on the survivors, as ``run_standard_evaluation`` does, so
    the component that broke each image is recorded (:func:`recording_components`); the seed of
    the reference is drawn from ``generator`` and it runs under a forked global RNG.
    ``step_size`` and ``steps`` are ignored (APGD adapts its step size; see ``n_iter``).

    Example:
        >>> x_adv = autoattack(model, x, y, eps=8 / 255, step_size=1.0, steps=1)
    """
    return _reference(model, x, y, b, "Linf", n_iter, n_queries, version)


@uniform_attack
def autoattack_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    b: Budget,
    *,
    n_iter: int = 100,
    n_queries: int = 5000,
    version: str = "standard",
) -> Tensor:
    r"""The reference AutoAttack (see :func:`autoattack`) in L2 (e.g. eps 0.5 on CIFAR-10).

    Example:
        >>> x_adv = autoattack_l2(model, x, y, eps=0.5, step_size=1.0, steps=1)
    """
    return _reference(model, x, y, b, "L2", n_iter, n_queries, version)


@uniform_attack
def autoattack_torchattacks(
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
    Hein, ICML 2020), run with torchattacks' components (the reference is :func:`autoattack`).

    Distance measure: L-inf (e.g. eps 8/255). APGD-CE, APGD-T (9 target classes), FAB-T (9
    target classes) and Square (``n_queries``, standard: 5000, with the reference's fixed
    ``p`` schedule, ``resc_schedule=False``), one restart each, every attack only on the points
    the earlier ones did not fool (torchattacks' ``MultiAttack``). ``version`` is recorded in
    results and must be "standard" (the only composition assembled here; no per-image component
    is recorded). NB:
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

    if version != "standard":
        raise ValueError(f"autoattack_torchattacks: only version 'standard', got {version!r}")
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
