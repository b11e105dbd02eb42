"""White-box gradient attacks: FGSM, PGD in L-inf and L2, MIM and CW-inf.

Each solves Eq. (1) of the spec, ``x_adv = argmax_{||x' - x||_p <= eps} L(F(x'), y)``,
approximately from the input gradient: FGSM (Goodfellow et al. 2015), PGD-k in L-inf and L2 with
a random start (Madry et al. 2018), MIM (Dong et al. 2018) and CW-inf (PGD on the Carlini-Wagner
margin loss, Carlini and Wagner 2017). PGD, MIM and CW-inf share one projected sign-gradient
iterate (:func:`_linf_iterate`) and differ only in the loss and the momentum. Arguments and
result of every attack are those of :class:`~rarn.robust.attacks.interface.AttackFn`; each
docstring adds what is particular to it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.models.common import logit_margin
from rarn.robust.attacks.interface import Budget, _rand, _randn, uniform_attack

__all__ = ["cw", "cw_margin_loss", "fgsm", "input_gradient", "mim", "pgd", "pgd_l2"]


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


def input_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = _ce_loss,
) -> Tensor:
    """Gradient of ``loss_fn(model(x), y)`` (default: summed cross-entropy) w.r.t. ``x``.

    The caller sets the grad mode (and :func:`rarn.models.common.eval_mode`). A loss that does
    not depend on ``x`` has a gradient of exactly zero, which the zero-gradient masking check
    (:func:`rarn.robust.evaluation.check_zero_gradients`) relies on.
    """
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
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    b: Budget,
    *,
    random_start: bool,
    decay: float | None = None,
) -> Tensor:
    """Sign-gradient ascent on ``loss_fn`` projected on the L-inf ball and [0, 1].

    The one iterate of PGD (cross-entropy), CW-inf (margin loss) and MIM (``decay`` set: the
    step follows the momentum of L1-normalised gradients instead of the gradient).
    """
    x_adv = x.clone()
    if random_start:
        x_adv = (x + (2 * _rand(tuple(x.shape), x, b.generator) - 1) * b.eps).clamp(0, 1)
    momentum = torch.zeros_like(x)
    for _ in range(b.steps):
        grad = input_gradient(model, x_adv, y, loss_fn)
        if decay is not None:  # MIM: accumulate L1-normalised gradients
            l1 = grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12)
            momentum = decay * momentum + grad / _per_sample(l1)
            grad = momentum
        x_adv = x_adv + b.step_size * grad.sign()
        # NB: clamping to [0, 1] after the projection keeps the ball: x itself is in [0, 1].
        x_adv = torch.minimum(torch.maximum(x_adv, x - b.eps), x + b.eps).clamp(0, 1)
    return x_adv


@uniform_attack
def fgsm(model: nn.Module, x: Tensor, y: Tensor, b: Budget) -> Tensor:
    r"""FGSM in the paper 'Explaining and Harnessing Adversarial Examples'
    [https://arxiv.org/abs/1412.6572] (Goodfellow et al., ICLR 2015).

    Distance measure: L-inf (e.g. eps 8/255). One step of size ``eps`` along the sign of the
    input gradient of the cross-entropy. ``step_size`` and ``steps`` are accepted for the uniform
    interface and ignored (but still validated); so is ``generator`` (FGSM is deterministic).

    Example:
        >>> x_adv = fgsm(model, x, y, eps=8 / 255, step_size=8 / 255, steps=1)
    """
    grad = input_gradient(model, x, y, _ce_loss)
    return (x + b.eps * grad.sign()).clamp(0, 1)


@uniform_attack
def pgd(model: nn.Module, x: Tensor, y: Tensor, b: Budget, *, random_start: bool = True) -> Tensor:
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083] (Madry et al., ICLR 2018).

    Distance measure: L-inf. Random start uniform in the eps-ball (drawn from ``generator``),
    then ``steps`` sign-gradient steps on the cross-entropy, each projected on the ball and on
    [0, 1]; returns the last iterate. The paper's protocol: eps 8/255, step_size 2/255, 20 steps
    for PGD-20 (7 for PGD-7 training). ``random_start=False`` starts at ``x``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x_adv = pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20, generator=g)
    """
    return _linf_iterate(model, x, y, _ce_loss, b, random_start=random_start)


@uniform_attack
def pgd_l2(
    model: nn.Module, x: Tensor, y: Tensor, b: Budget, *, random_start: bool = True
) -> Tensor:
    r"""PGD-L2 in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083] (Madry et al., ICLR 2018).

    Distance measure: L2 (``eps`` is an L2 radius over C*H*W values, e.g. 0.5 on CIFAR-10;
    ``step_size`` the L2 length of each step, e.g. eps / 4). Random start (unless
    ``random_start=False``): a uniformly random direction scaled by ``eps * u``, ``u ~ U[0, 1)``
    (as in torchattacks' PGDL2); steps along the L2-normalised gradient, projected on the ball
    and clipped to [0, 1].

    Example:
        >>> x_adv = pgd_l2(model, x, y, eps=0.5, step_size=0.1, steps=20)
    """

    def l2(v: Tensor) -> Tensor:
        return _per_sample(v.flatten(1).norm(dim=1).clamp_min(1e-12))

    N = x.shape[0]
    x_adv = x.clone()
    if random_start:
        d = _randn(tuple(x.shape), x, b.generator)
        r = _rand((N,), x, b.generator)
        x_adv = (x + d / l2(d) * _per_sample(r) * b.eps).clamp(0, 1)
    for _ in range(b.steps):
        grad = input_gradient(model, x_adv, y, _ce_loss)
        x_adv = x_adv + b.step_size * grad / l2(grad)
        delta = x_adv - x
        delta = delta * (b.eps / l2(delta)).clamp(max=1.0)
        # Clipping to [0, 1] moves each coordinate towards x (in [0, 1]): the norm only shrinks.
        x_adv = (x + delta).clamp(0, 1)
    return x_adv


@uniform_attack
def mim(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    b: Budget,
    *,
    decay: float = 1.0,
    random_start: bool = False,
) -> Tensor:
    r"""MIM (MI-FGSM) in the paper 'Boosting Adversarial Attacks with Momentum'
    [https://arxiv.org/abs/1710.06081] (Dong et al., CVPR 2018).

    Distance measure: L-inf. ``g <- decay * g + grad / ||grad||_1`` (``decay``: the momentum
    factor mu, default 1.0), step ``step_size * sign(g)``, projected on the eps-ball and [0, 1].
    No random start by default, as in the paper (``random_start=True`` draws one from
    ``generator``). The spec's protocol: eps 8/255, step_size 2/255, 20 steps.

    Example:
        >>> x_adv = mim(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20)
    """
    return _linf_iterate(model, x, y, _ce_loss, b, random_start=random_start, decay=decay)


@uniform_attack
def cw(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    b: Budget,
    *,
    kappa: float = math.inf,
    random_start: bool = True,
) -> Tensor:
    r"""CW-inf: PGD on the margin loss of 'Towards Evaluating the Robustness of Neural Networks'
    [https://arxiv.org/abs/1608.04644] (Carlini and Wagner, S&P 2017).

    Distance measure: L-inf. Like :func:`pgd` (same random start and steps; typically eps 8/255,
    step_size 2/255, 20-30 steps) but maximising ``max_{j != y} z_j - z_y`` clamped at the
    confidence ``kappa`` (see :func:`cw_margin_loss`; default: no clamp). This is the "CW"
    column of robust-NAS tables, not the L2 optimisation attack of the paper.

    Example:
        >>> x_adv = cw(model, x, y, eps=8 / 255, step_size=2 / 255, steps=30)
    """
    loss = functools.partial(cw_margin_loss, kappa=kappa)
    return _linf_iterate(model, x, y, loss, b, random_start=random_start)
