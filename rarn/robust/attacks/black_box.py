"""A Square-style black-box random search (Andriushchenko et al. 2020), the masking check.

Uses only the model's outputs, so gradient masking cannot hide from it: when it beats the
white-box suite the white-box numbers are not to be trusted (:mod:`rarn.robust.evaluation`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rarn.models.common import logit_margin
from rarn.robust.attacks.interface import Budget, _rand, uniform_attack

__all__ = ["square"]

# Square's schedule for the fraction p of pixels changed (Andriushchenko et al., App. A), written
# for 10,000 queries: (iteration upper bound, divisor). AutoAttack's reference runs it unscaled
# (resc_schedule=False); rescaling stretches it over a smaller budget.
_P_SCHEDULE = (
    (10, 1), (50, 2), (200, 4), (500, 8), (1000, 16),
    (2000, 32), (4000, 64), (6000, 128), (8000, 256),
)  # fmt: skip


def _square_p(p_init: float, it: int, n_iters: int, rescale: bool = False) -> float:
    if rescale:
        it = int(it / n_iters * 10000)
    for bound, div in _P_SCHEDULE:
        if it <= bound:
            return p_init / div
    return p_init / 512


@uniform_attack
def square(
    model: nn.Module, x: Tensor, y: Tensor, b: Budget, *, p_init: float = 0.8, rescale: bool = False
) -> Tensor:
    r"""Square-style random search from 'Square Attack: a query-efficient black-box adversarial
    attack via random search' [https://arxiv.org/abs/1912.00049] (Andriushchenko et al., ECCV
    2020); a compact re-implementation used as the black-box gradient-masking check, not the
    AutoAttack component (that one comes with :func:`~rarn.robust.attacks.autoattack`).

    Distance measure: L-inf (e.g. eps 8/255). Uses only the model's outputs (no gradients):
    starts from vertical stripes of +-eps, then each query redraws one random square window to
    +-eps per channel and keeps it when the margin ``max_{j != y} z_j - z_y`` grows. The window's
    side follows the paper's p schedule, starting at the fraction ``p_init`` of the pixels
    (default 0.8); the schedule is the one written for 10,000 queries, used as is, as AutoAttack's
    reference does (its ``resc_schedule=False``; ``rescale=True`` stretches it over ``steps``
    queries instead). A candidate is kept only if it beats the current point (the clean input
    included), so a misclassified input never becomes correct. Points already misclassified stop
    querying. ``steps`` is the number of queries after the initial one (e.g. 500-5000);
    ``step_size`` is ignored (the step is always +-eps); ``generator`` draws the stripes, windows
    and signs.

    Example:
        >>> x_adv = square(model, x, y, eps=8 / 255, step_size=1.0, steps=1000)
    """
    eps, steps, generator = b.eps, b.steps, b.generator
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
            p = _square_p(p_init, it, steps, rescale)
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
