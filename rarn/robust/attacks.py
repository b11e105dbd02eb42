"""Adversarial attacks behind one registered interface (spec section 6.1).

Every attack solves Eq. (1) of the spec, ``x_adv = argmax_{||x' - x||_p <= eps} L(F(x'), y)``,
approximately and has the signature ``attack(model, x, y, *, eps, step_size, steps, generator)
-> x_adv`` (inputs NCHW in [0, 1], the model returns logits). Implemented here: FGSM (Goodfellow
et al. 2015), PGD-k in L-inf and L2 with a random start (Madry et al. 2018), MIM (Dong et al.
2018), CW-inf (PGD on the Carlini-Wagner margin loss, Carlini and Wagner 2017) and a small
Square-style random search (Andriushchenko et al. 2020) used as the black-box sanity check.
AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square; Croce and Hein 2020) and a
reference PGD come from ``torchattacks``, imported lazily so that ``rarn`` imports without it.

Validation, the model's train/eval mode (:func:`eval_mode`) and ``torch.enable_grad`` live in one
decorator, so each attack body is only its update rule. Randomness comes from an explicit
``torch.Generator``; ``None`` means a generator seeded with 0 (deterministic, not fresh).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.models.common import eval_mode, logit_margin

__all__ = [
    "ATTACKS",
    "ATTACK_IMPL",
    "ATTACK_NORM",
    "AttackFn",
    "autoattack",
    "cw",
    "cw_margin_loss",
    "eval_mode",
    "fgsm",
    "get_attack",
    "mim",
    "pgd",
    "pgd_l2",
    "pgd_torchattacks",
    "square",
    "validate_attack_args",
]

logger = logging.getLogger(__name__)


class AttackFn(Protocol):
    """``attack(model, x, y, *, eps, step_size, steps, generator) -> x_adv``."""

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        eps: float,
        step_size: float,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def _finite_positive(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def validate_attack_args(x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int) -> None:
    """Raise ``ValueError`` with a clear message unless the arguments of an attack are valid.

    Args:
        x: inputs, shape (N, C, H, W), floating point, values in [0, 1].
        y: integer labels, shape (N,).
        eps: radius of the threat model, finite and > 0.
        step_size: step per iteration, finite and > 0.
        steps: number of iterations, an int >= 1.

    Raises:
        ValueError: naming the offending argument and its value.
    """
    _finite_positive("eps", eps)
    _finite_positive("step_size", step_size)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point NCHW tensor, got {got}")
    if not isinstance(y, Tensor) or y.ndim != 1 or y.is_floating_point() or y.is_complex():
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a 1-D integer tensor of labels, got {got}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x))  # one device sync; NaN fails both tests
        if not (lo >= 0 and hi <= 1):
            raise ValueError(
                f"x must lie in [0, 1] (attacks work in pixel space), got [{lo}, {hi}]"
            )


def _uniform_attack(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Validation, eval mode, grad mode and the default generator: the one shared wrapper."""

    @functools.wraps(fn)
    def attack(
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        eps: float,
        step_size: float,
        steps: int,
        generator: torch.Generator | None = None,
        **kwargs: object,
    ) -> Tensor:
        validate_attack_args(x, y, eps=eps, step_size=step_size, steps=steps)
        if x.shape[0] == 0:
            return x.detach().clone()
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        # enable_grad: callers often evaluate under torch.no_grad(); attacks need input grads.
        with eval_mode(model), torch.enable_grad():
            x_adv = fn(
                model,
                x.detach(),
                y.detach(),
                eps=float(eps),
                step_size=float(step_size),
                steps=int(steps),
                generator=generator,
                **kwargs,
            )
        return x_adv.detach()

    return attack


# --- shared pieces ------------------------------------------------------------------------------


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """U[0, 1) noise drawn on the generator's device, then moved to ``like``'s device."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return u.to(like.device)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return u.to(like.device)


def _ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    # Sum, not mean: the per-sample gradient does not shrink with the batch size.
    return F.cross_entropy(logits, y, reduction="sum")


def cw_margin_loss(logits: Tensor, y: Tensor, kappa: float = math.inf) -> Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y``, clamped at ``kappa``, summed.

    Args:
        logits: shape (N, K).
        y: labels, shape (N,).
        kappa: confidence; the margin stops counting above it (default: no clamp).

    Returns:
        Scalar loss; positive per-sample terms mean misclassified.
    """
    return logit_margin(logits, y).clamp(max=kappa).sum()


def _input_grad(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    x = x.detach().requires_grad_(True)
    loss = loss_fn(model(x), y)
    if not loss.requires_grad:  # output detached from the input: a gradient of exactly zero
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, materialize_grads=True)
    return grad


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, *([1] * 3))  # (N,) -> (N, 1, 1, 1) for NCHW broadcasting


def _linf_iterate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    random_start: bool,
    decay: float | None = None,
) -> Tensor:
    """Sign-gradient ascent projected on the L-inf ball and [0, 1] (PGD, CW-inf, MIM)."""
    x_adv = x.clone()
    if random_start:
        x_adv = (x + (2 * _rand(tuple(x.shape), x, generator) - 1) * eps).clamp(0, 1)
    momentum = torch.zeros_like(x)
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y, loss_fn)
        if decay is not None:  # MIM: accumulate L1-normalised gradients
            l1 = grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12)
            momentum = decay * momentum + grad / _per_sample(l1)
            grad = momentum
        x_adv = x_adv + step_size * grad.sign()
        # NB: clamping to [0, 1] after the projection keeps the ball: x itself is in [0, 1].
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


# --- white-box attacks --------------------------------------------------------------------------


@_uniform_attack
def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""FGSM in the paper 'Explaining and Harnessing Adversarial Examples'
    [https://arxiv.org/abs/1412.6572] (Goodfellow et al., ICLR 2015).

    Distance measure: L-inf. One step of size ``eps`` along the sign of the input gradient of
    the cross-entropy; ``step_size``, ``steps`` and ``generator`` are accepted for the uniform
    interface and ignored (but still validated).

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius (e.g. 8/255).
        step_size: ignored.
        steps: ignored (FGSM is one step).
        generator: ignored (FGSM is deterministic).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> x_adv = fgsm(model, x, y, eps=8 / 255, step_size=8 / 255, steps=1)
    """
    grad = _input_grad(model, x, y, _ce_loss)
    return (x + eps * grad.sign()).clamp(0, 1)


@_uniform_attack
def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> Tensor:
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083] (Madry et al., ICLR 2018).

    Distance measure: L-inf. Random start uniform in the eps-ball, then ``steps`` sign-gradient
    steps on the cross-entropy, each projected on the ball and on [0, 1]; returns the last
    iterate.

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius (default in the paper's protocol: 8/255).
        step_size: step per iteration (2/255).
        steps: number of iterations (20 for PGD-20, 7 for PGD-7 training).
        generator: draws the random start (None: seeded with 0).
        random_start: start uniformly in the ball (default True).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20, generator=g)
    """
    assert generator is not None  # filled in by the wrapper
    return _linf_iterate(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        generator=generator,
        loss_fn=_ce_loss,
        random_start=random_start,
    )


@_uniform_attack
def pgd_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> Tensor:
    r"""PGD-L2 in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083] (Madry et al., ICLR 2018).

    Distance measure: L2 (``eps`` is an L2 radius over C*H*W values, e.g. 0.5 on CIFAR-10).
    Random start: a uniformly random direction scaled by ``eps * u``, ``u ~ U[0, 1)`` (as in
    torchattacks' PGDL2); steps along the L2-normalised gradient, projected on the ball and
    clipped to [0, 1].

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L2 radius (e.g. 0.5).
        step_size: L2 length of each step (e.g. eps / 4).
        steps: number of iterations (e.g. 20).
        generator: draws the random start (None: seeded with 0).
        random_start: start at a random point of the ball (default True).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L2.

    Example:
        >>> x_adv = pgd_l2(model, x, y, eps=0.5, step_size=0.1, steps=20)
    """
    assert generator is not None

    def l2(v: Tensor) -> Tensor:
        return _per_sample(v.flatten(1).norm(dim=1).clamp_min(1e-12))

    N = x.shape[0]
    x_adv = x.clone()
    if random_start:
        d = _randn(tuple(x.shape), x, generator)
        r = _rand((N,), x, generator)
        x_adv = (x + d / l2(d) * _per_sample(r) * eps).clamp(0, 1)
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y, _ce_loss)
        x_adv = x_adv + step_size * grad / l2(grad)
        delta = x_adv - x
        delta = delta * (eps / l2(delta)).clamp(max=1.0)
        # Clipping to [0, 1] moves each coordinate towards x (in [0, 1]): the norm only shrinks.
        x_adv = (x + delta).clamp(0, 1)
    return x_adv


@_uniform_attack
def mim(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    decay: float = 1.0,
    random_start: bool = False,
) -> Tensor:
    r"""MIM (MI-FGSM) in the paper 'Boosting Adversarial Attacks with Momentum'
    [https://arxiv.org/abs/1710.06081] (Dong et al., CVPR 2018).

    Distance measure: L-inf. ``g <- decay * g + grad / ||grad||_1``, step ``step_size *
    sign(g)``, projected on the eps-ball and [0, 1]. No random start by default, as in the paper.

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius (8/255).
        step_size: step per iteration (2/255).
        steps: number of iterations (20 in the spec's protocol).
        generator: draws the random start when enabled (None: seeded with 0).
        decay: momentum decay factor mu (default 1.0).
        random_start: start uniformly in the ball (default False).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> x_adv = mim(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20)
    """
    assert generator is not None
    return _linf_iterate(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        generator=generator,
        loss_fn=_ce_loss,
        random_start=random_start,
        decay=decay,
    )


@_uniform_attack
def cw(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    kappa: float = math.inf,
    random_start: bool = True,
) -> Tensor:
    r"""CW-inf: PGD on the margin loss of 'Towards Evaluating the Robustness of Neural Networks'
    [https://arxiv.org/abs/1608.04644] (Carlini and Wagner, S&P 2017).

    Distance measure: L-inf. Like :func:`pgd` but maximising ``max_{j != y} z_j - z_y`` (see
    :func:`cw_margin_loss`); this is the "CW" column of robust-NAS tables, not the L2
    optimisation attack of the paper.

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius (8/255).
        step_size: step per iteration (2/255).
        steps: number of iterations (20-30).
        generator: draws the random start (None: seeded with 0).
        kappa: confidence at which the margin is clamped (default: no clamp).
        random_start: start uniformly in the ball (default True).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> x_adv = cw(model, x, y, eps=8 / 255, step_size=2 / 255, steps=30)
    """
    assert generator is not None
    return _linf_iterate(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=steps,
        generator=generator,
        loss_fn=functools.partial(cw_margin_loss, kappa=kappa),
        random_start=random_start,
    )


# --- black-box attack ---------------------------------------------------------------------------

# Square's schedule for the fraction p of pixels changed (Andriushchenko et al., App. A),
# written for 10,000 queries and rescaled to the actual budget: (iteration upper bound, divisor).
_P_SCHEDULE = (
    (10, 1), (50, 2), (200, 4), (500, 8), (1000, 16),
    (2000, 32), (4000, 64), (6000, 128), (8000, 256),
)  # fmt: skip


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    it = int(it / n_iters * 10000)
    for bound, div in _P_SCHEDULE:
        if it <= bound:
            return p_init / div
    return p_init / 512


@_uniform_attack
def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    p_init: float = 0.8,
) -> Tensor:
    r"""Square-style random search from 'Square Attack: a query-efficient black-box adversarial
    attack via random search' [https://arxiv.org/abs/1912.00049] (Andriushchenko et al., ECCV
    2020); a compact re-implementation used as the black-box gradient-masking check, not the
    AutoAttack component (that one comes with :func:`autoattack`).

    Distance measure: L-inf. Uses only the model's outputs (no gradients): starts from vertical
    stripes of +-eps, then each query redraws one random square window (side from the paper's
    p schedule) to +-eps per channel and keeps it when the margin ``max_{j != y} z_j - z_y``
    grows. A candidate is kept only if it beats the current point (the clean input included), so
    a misclassified input never becomes correct. Points already misclassified stop querying.

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius (8/255).
        step_size: ignored (the step is always +-eps).
        steps: number of queries after the initial one (e.g. 500-5000).
        generator: draws the stripes, windows and signs (None: seeded with 0).
        p_init: initial fraction of pixels changed per query (default 0.8).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> x_adv = square(model, x, y, eps=8 / 255, step_size=1.0, steps=1000)
    """
    assert generator is not None
    N, C, H, W = x.shape

    def signs(shape: tuple[int, ...]) -> Tensor:
        return eps * (2 * (_rand(shape, x, generator) < 0.5).to(x.dtype) - 1)

    with torch.no_grad():
        best, best_margin = x.clone(), logit_margin(model(x), y)
        cand = (x + signs((N, C, 1, W))).clamp(0, 1)  # vertical stripes
        m = logit_margin(model(cand), y)
        better = m > best_margin
        best[better], best_margin[better] = cand[better], m[better]
        rows = torch.arange(H, device=x.device)
        cols = torch.arange(W, device=x.device)
        for it in range(steps):
            active = (best_margin < 0).nonzero().squeeze(1)  # still correctly classified
            if active.numel() == 0:
                break
            n = active.numel()
            p = _square_p(p_init, it, steps)
            s = min(max(round(math.sqrt(p * H * W)), 1), max(min(H, W) - 1, 1))
            top = (_rand((n,), x, generator) * (H - s + 1)).long().clamp(max=H - s)
            left = (_rand((n,), x, generator) * (W - s + 1)).long().clamp(max=W - s)
            in_h = (rows >= top[:, None]) & (rows < top[:, None] + s)  # (n, H)
            in_w = (cols >= left[:, None]) & (cols < left[:, None] + s)  # (n, W)
            window = in_h[:, None, :, None] & in_w[:, None, None, :]  # (n, 1, H, W)
            xa = x[active]
            delta = torch.where(window, signs((n, C, 1, 1)), best[active] - xa)
            cand = (xa + delta).clamp(0, 1)
            m = logit_margin(model(cand), y[active])
            better = m > best_margin[active]
            idx = active[better]
            best[idx], best_margin[idx] = cand[better], m[better]
    return best


# --- torchattacks (optional) --------------------------------------------------------------------


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


@_uniform_attack
def pgd_torchattacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""torchattacks' ``PGD`` (Madry et al. 2018, [https://arxiv.org/abs/1706.06083]) behind the
    uniform interface: the reference our :func:`pgd` is tested against.

    Distance measure: L-inf. Requires ``torchattacks`` (imported here, not at module import).
    The random start uses torch's global RNG, so it runs under a forked RNG seeded from
    ``generator``: deterministic, and the caller's global RNG state is left untouched.

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius.
        step_size: step per iteration (torchattacks' ``alpha``).
        steps: number of iterations.
        generator: seeds the random start (None: seeded with 0).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> x_adv = pgd_torchattacks(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20)
    """
    import torchattacks

    assert generator is not None
    atk = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    with _isolated_global_rng(x, _seed_from(generator)):
        return atk(x, y).to(dtype=x.dtype, device=x.device)


@_uniform_attack
def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    n_iter: int = 100,
    n_queries: int = 5000,
) -> Tensor:
    r"""AutoAttack, standard version, from 'Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690] (Croce and
    Hein, ICML 2020), run with torchattacks' components.

    Distance measure: L-inf. APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes) and
    Square (``n_queries``), one restart each, every attack only on the points the earlier ones
    did not fool (torchattacks' ``MultiAttack``). NB: torchattacks' own ``AutoAttack(version=
    'standard')`` leaves APGD/FAB at 10 iterations; the reference standard version uses 100, so
    the components are assembled here with ``n_iter=100`` by default. Requires ``torchattacks``
    (imported here). torchattacks re-seeds torch's global RNG; it runs under a forked RNG
    seeded from ``generator``.

    Args:
        model: classifier returning logits (N, K).
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: L-inf radius (8/255).
        step_size: ignored (APGD adapts its step size).
        steps: ignored (see ``n_iter``), so a suite-wide PGD step count cannot weaken it.
        generator: seeds the attacks (None: seeded with 0).
        n_iter: iterations of APGD-CE, APGD-T and FAB-T (standard: 100).
        n_queries: queries of Square (standard: 5000).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1], within ``eps`` of ``x`` in L-inf.

    Example:
        >>> x_adv = autoattack(model, x, y, eps=8 / 255, step_size=1.0, steps=1)
    """
    import torchattacks as ta

    assert generator is not None
    with torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    k = min(n_classes, 10)  # torchattacks targets the top (k - 1) classes: 9, as the reference
    seed = _seed_from(generator)
    common = {"norm": "Linf", "eps": eps, "seed": seed, "n_restarts": 1}
    atk = ta.MultiAttack(
        [
            ta.APGD(model, steps=n_iter, loss="ce", **common),
            ta.APGDT(model, steps=n_iter, n_classes=k, **common),
            ta.FAB(model, steps=n_iter, multi_targeted=True, n_classes=k, **common),
            ta.Square(model, n_queries=n_queries, **common),
        ]
    )
    with _isolated_global_rng(x, seed):
        return atk(x, y).to(dtype=x.dtype, device=x.device)


# --- registry -----------------------------------------------------------------------------------

ATTACKS: dict[str, AttackFn] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "pgd_l2": pgd_l2,
    "mim": mim,
    "cw": cw,
    "square": square,
    "autoattack": autoattack,
    "pgd_torchattacks": pgd_torchattacks,
}
"""Attack name -> function with the uniform signature."""

ATTACK_NORM: dict[str, str] = {name: "linf" for name in ATTACKS} | {"pgd_l2": "l2"}
"""Attack name -> threat model of its ``eps`` ("linf" or "l2")."""

_RARN_VERSION = _dist_version("rarn")
_TORCHATTACKS_VERSION = _dist_version("torchattacks")
ATTACK_IMPL: dict[str, tuple[str, str]] = {
    name: ("rarn", _RARN_VERSION)
    for name in ATTACKS
    if name not in ("autoattack", "pgd_torchattacks")
} | {
    "autoattack": ("torchattacks", _TORCHATTACKS_VERSION),
    "pgd_torchattacks": ("torchattacks", _TORCHATTACKS_VERSION),
}
"""Attack name -> (implementation, version) for results tables."""


def get_attack(name: str) -> AttackFn:
    """Look up an attack by name.

    Args:
        name: a key of :data:`ATTACKS`.

    Returns:
        The attack function.

    Raises:
        KeyError: listing the known names.
    """
    try:
        return ATTACKS[name]
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}") from None
