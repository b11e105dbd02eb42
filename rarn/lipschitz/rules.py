"""The one table of Lipschitz rules: how each layer type's l2 Lipschitz constant is bounded.

Composition (RACL spec §2.3): ``Lip(f o g) <= Lip(f) Lip(g)``, so a chain (``nn.Sequential``)
adds the log-bounds of its entries. Per layer (rows of :data:`RULES`):

* conv / linear: ``sqrt(windows per pixel) * sigma_max(W reshaped)``: the conv applies ``W``
  (``C_out x C_in kh kw``) to im2col patches and each input pixel is copied into at most
  ``windows_h * windows_w`` patches (any padding, stride, dilation). 1 x 1 convs and linears: 1.
* depthwise conv: channels are independent, and by Young's inequality each channel's operator
  norm is at most the l1 norm of its kernel, for any padding, stride or dilation.
* BatchNorm: the eval-mode scale ``max_c |gamma_c| / sqrt(var_c + eps)`` from the running
  statistics (without it BN could undo any spectral constraint).
* max pool: ``sqrt(windows per pixel)``: ``(max_w x - max_w y)^2 <= sum_w (x - y)^2``.
* average pool: its matrix's Schur test ``sqrt(max row sum * max column sum)``, worst case over
  map sizes.
* ReLU, identity, dropout (eval), flatten: 1; ``none``: 0 (log ``-inf``); global average pool: 1;
  FactorizedReduce: its two convs read disjoint pixels, so ``max(sigma_1, sigma_2)`` x BN scale.

Every rule has two faces, kept side by side so that they cannot drift apart:

* ``terms``, the *search-time estimate*: the layer as log-additive :class:`Term` s, which
  :class:`~rarn.lipschitz.estimator.LipschitzEstimator` evaluates for all supernet ops at once
  (stacked weights, batched power iteration with persistent vectors, one step per architecture
  step). Cheap, but power iteration converges to ``sigma_max`` from *below*.
* ``certified``, the *certified bound* of a discrete network (:mod:`rarn.lipschitz.certify`): a
  float that is provably above the layer's constant in eval mode.

Where the faces differ, and why:

* spectral norms: estimated by warm power iteration (a few kernels per step for the whole
  supernet); certified from above by the trace of a Gram-matrix power (:func:`_log_spectral_norm`),
  a dozen matmuls, run once per report.
* depthwise conv: the estimate is Young's bound alone (the spec's per-channel rule, §2.3, which
  the search was specified and tuned with); the certificate takes the smaller of Young's bound and
  the block-diagonal spectral bound, both of which are certified.

Average pools get the worst case over *every* map size on both faces: the supernet meets small
maps (4 x 4 and 2 x 2 after two reductions) whose borders differ from the interior (on a 1 x 1 map
a pool is the identity, norm 1 > 5/6 of the stride-2 interior constant), so the interior Schur
constant (:func:`avg_pool_lipschitz`, 7/6 for the DARTS 3 x 3 stride-1 pool) is not a bound there.
It is a constant per pool shape (cached), so the search pays nothing for it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.space.ops import FactorizedReduce, Zero

__all__ = [
    "RULES",
    "Rule",
    "Term",
    "avg_pool_lipschitz",
    "bn_log_scale",
    "certified_log_bound",
    "chain_log_bound",
    "depthwise_log_bound",
    "rule_for",
    "terms_of",
]

# ----------------------------------------------------------------------------------------------
# Norms of single linear maps (both faces use these).


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _windows_per_pixel(k: int, stride: int, dilation: int = 1) -> int:
    """Most output windows (along one axis) that one input pixel can fall in."""
    return min(k, math.ceil((dilation * (k - 1) + 1) / stride))


def _window_log_factor(m: nn.Conv2d | nn.MaxPool2d) -> float:
    """``log sqrt(windows_h * windows_w)``: the norm of the map from an image to its windows."""
    (kh, kw), (sh, sw), (dh, dw) = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    return 0.5 * math.log(_windows_per_pixel(kh, sh, dh) * _windows_per_pixel(kw, sw, dw))


def _is_depthwise(m: nn.Conv2d) -> bool:
    return m.groups == m.in_channels and m.out_channels == m.groups


def depthwise_log_bound(weight: Tensor) -> Tensor:
    """log of ``max_c ||w_c||_1`` for a depthwise kernel ``[C, 1, kh, kw]`` (batched over dims)."""
    return weight.abs().sum(dim=(-1, -2, -3)).amax(dim=-1).clamp_min(1e-30).log()


def bn_log_scale(running_var: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
    """log of the eval-mode BN gain ``max_c |gamma_c| / sqrt(var_c + eps)`` (batched)."""
    s = -0.5 * (running_var + eps).log()
    if weight is not None:
        s = s + weight.abs().clamp_min(1e-30).log()
    return s.amax(dim=-1)


def _log_spectral_norm(w: Tensor, squarings: int = 12) -> float:
    """Certified log upper bound of the largest ``sigma_max`` of the matrices ``w [..., m, n]``.

    ``sigma_max^2 = lambda_max(G)`` for the Gram matrix ``G = W W^T`` (PSD), and
    ``lambda_max <= tr(G^p)^(1/p) <= m^(1/p) lambda_max``; with ``p = 2^12`` the bound is at most
    ``m^(1/8192)`` (0.1 % for m = 1000) above the exact value. ``G^p`` comes from repeated
    squaring with Frobenius normalisation (log-scale tracked), so it is a dozen matmuls: no
    eigensolver, which took seconds on a loaded two-core CPU, and no power iteration, which
    converges from below. A ``1e-9`` margin covers round-off.
    """
    w = w.detach().double()
    if w.shape[-2] > w.shape[-1]:
        w = w.transpose(-1, -2)
    g = w @ w.transpose(-1, -2)  # (..., m, m), PSD
    log_c = torch.zeros(g.shape[:-2], dtype=torch.float64, device=g.device)
    for _ in range(squarings):
        s = torch.linalg.matrix_norm(g).clamp_min(1e-300)  # Frobenius
        g = g / s[..., None, None]
        log_c = 2.0 * (log_c + s.log())  # G^(2^(i+1)) = exp(log_c) * (g @ g)
        g = g @ g
    tr = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)
    log_lam = (log_c + tr.log()) / 2.0**squarings  # log of the bound on sigma_max^2
    return 0.5 * float(log_lam.max()) + 1e-9


def avg_pool_lipschitz(
    kernel_size: int, stride: int, padding: int, count_include_pad: bool
) -> float:
    """Schur-test bound ``sqrt(max row sum * max column sum)`` on one large map (the interior)."""
    n = 4 * kernel_size + 4
    x = torch.ones(1, 1, n, n, requires_grad=True)
    y = F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=count_include_pad)
    (col,) = torch.autograd.grad(y.sum(), x)  # A^T 1: column sums
    return math.sqrt(float(col.max()) * 1.0)  # every row of an average sums to 1


@functools.lru_cache(maxsize=64)
def _avg_pool_log_bound(k: int, s: int, p: int, ceil_mode: bool, include_pad: bool) -> float:
    """An average pool's l2 norm bound, valid for every map size (both faces).

    The pool is linear, but its matrix depends on the map size near the borders
    (``count_include_pad=False`` averages fewer pixels there). For each side ``n < 4k + 4`` the
    bound is the smaller of the matrix's spectral-norm bound and its Schur test; at
    ``n >= 4k + 4`` the border patterns only repeat (with period ``stride``), so the Schur test
    of sizes ``4k + 4 .. 4k + 3 + stride`` covers all larger maps. For a 3 x 3 stride-1 pool this
    gives the 7/6 of :func:`avg_pool_lipschitz`, above the exact norms of small maps (<= 1.06).
    """

    def matrix(n: int) -> Tensor:  # (outputs, inputs) of the pool on an n x n map
        eye = torch.eye(n * n, dtype=torch.float64).view(n * n, 1, n, n)
        y = F.avg_pool2d(eye, k, s, p, ceil_mode=ceil_mode, count_include_pad=include_pad)
        return y.flatten(1).T  # column i is the pool of the i-th unit image

    def schur(a: Tensor) -> float:
        return 0.5 * math.log(float(a.abs().sum(0).max()) * float(a.abs().sum(1).max()))

    big = 4 * k + 4
    worst = max(schur(matrix(n)) for n in range(big, big + s))
    for n in range(max(1, k - 2 * p), big):
        a = matrix(n)
        worst = max(worst, min(schur(a), _log_spectral_norm(a)))
    return worst


# ----------------------------------------------------------------------------------------------
# The rules: per layer type, a decomposition into estimator terms and a certified bound.

TermKind = Literal["matrix", "max_matrix", "depthwise", "bn", "const", "zero"]


@dataclass(frozen=True)
class Term:
    """One log-additive factor of a layer's search-time estimate.

    ``matrix``: ``value`` + log ``sigma_max`` of the module's reshaped weight (power iteration);
    ``max_matrix``: the larger of two such sigmas; ``depthwise``: Young's bound; ``bn``: the
    eval-mode BN scale; ``const``: ``value``; ``zero``: the layer is 0 (log ``-inf``).
    """

    kind: TermKind
    modules: tuple[nn.Module, ...] = ()
    value: float = 0.0


TermsOf = Callable[[nn.Module], list[Term]]
BoundOf = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Rule:
    """The two faces of one layer type's bound (module docstring: where and why they differ).

    Both take the module and the function to apply to its children, so that a caller (the
    certifier) can put its own structural rules in front of the table.
    """

    terms: Callable[[nn.Module, TermsOf], list[Term]]
    certified: Callable[[nn.Module, BoundOf], float]


def chain_log_bound(modules: Iterable[nn.Module], bound_of: BoundOf) -> float:
    """A chain's bound: the sum of its members' log-bounds."""
    return sum((bound_of(m) for m in modules), 0.0)


def _conv_terms(m: nn.Conv2d, _: TermsOf) -> list[Term]:
    if m.groups == 1:
        return [Term("matrix", (m,), _window_log_factor(m))]
    if _is_depthwise(m):
        return [Term("depthwise", (m,))]
    raise NotImplementedError(f"no Lipschitz rule for a grouped conv with groups={m.groups}")


def _conv_certified(m: nn.Conv2d, _: BoundOf) -> float:
    """Grouped convs are block diagonal (max over groups); depthwise also has Young's bound."""
    w = m.weight.detach().double()
    G = m.groups
    wg = w.reshape(G, w.shape[0] // G, -1)  # (G, C_out / G, C_in / G * kh * kw)
    bound = _window_log_factor(m) + _log_spectral_norm(wg)
    if _is_depthwise(m):
        bound = min(bound, float(depthwise_log_bound(w.float())))
    return bound


def _bn_terms(m: nn.BatchNorm2d, _: TermsOf) -> list[Term]:
    _check_running_stats(m)
    return [Term("bn", (m,))]


def _bn_certified(m: nn.BatchNorm2d, _: BoundOf) -> float:
    _check_running_stats(m)
    gamma = m.weight.detach() if m.affine else None
    return float(bn_log_scale(m.running_var.double(), m.eps, gamma))


def _check_running_stats(m: nn.Module) -> None:
    if m.running_var is None:
        raise NotImplementedError("BatchNorm without running statistics has no fixed bound")


def _avg_pool_log(m: nn.AvgPool2d) -> float:
    (k, _), (p, _) = _pair(m.kernel_size), _pair(m.padding)
    s = _pair(m.stride or m.kernel_size)[0]
    return _avg_pool_log_bound(k, s, p, bool(m.ceil_mode), bool(m.count_include_pad))


def _global_pool(m: nn.AdaptiveAvgPool2d) -> float:
    if _pair(m.output_size) != (1, 1):
        raise NotImplementedError("no Lipschitz rule for an adaptive pool to more than 1 x 1")
    return 0.0  # global mean: norm 1 / sqrt(HW) <= 1


def _fr_terms(m: FactorizedReduce, terms: TermsOf) -> list[Term]:
    # 1 x 1 convs have no window factor (and the ReLU none), so only the sigmas and BN remain.
    return [Term("max_matrix", (m.conv_1, m.conv_2)), *terms(m.bn)]


def _fr_certified(m: FactorizedReduce, bound: BoundOf) -> float:
    return max(bound(m.conv_1), bound(m.conv_2)) + bound(m.bn)


def _const(log_value: Callable[[nn.Module], float]) -> Rule:
    """A layer with a fixed constant: the same number on both faces."""
    return Rule(lambda m, _: [Term("const", value=log_value(m))], lambda m, _: log_value(m))


_ONE = Rule(lambda m, _: [], lambda m, _: 0.0)
_BN = Rule(_bn_terms, _bn_certified)

# Looked up along the module's MRO, so subclasses (ReLUConvBN, SepConv, WideResNet are
# ``nn.Sequential`` s) use their base class's rule.
RULES: dict[type[nn.Module], Rule] = {
    Zero: Rule(lambda m, _: [Term("zero")], lambda m, _: float("-inf")),
    nn.Identity: _ONE,
    nn.ReLU: _ONE,
    nn.ReLU6: _ONE,
    nn.Dropout: _ONE,  # eval mode: the identity
    nn.Flatten: _ONE,
    nn.Sequential: Rule(
        lambda m, terms: [t for child in m for t in terms(child)],
        lambda m, bound: chain_log_bound(m, bound),
    ),
    FactorizedReduce: Rule(_fr_terms, _fr_certified),
    # Differ (module docstring): sigma by power iteration vs from above; depthwise: Young alone
    # vs the smaller of two certified bounds.
    nn.Conv2d: Rule(_conv_terms, _conv_certified),
    nn.Linear: Rule(lambda m, _: [Term("matrix", (m,))], lambda m, _: _log_spectral_norm(m.weight)),
    nn.BatchNorm1d: _BN,
    nn.BatchNorm2d: _BN,
    nn.MaxPool2d: _const(_window_log_factor),
    # A constant valid for every map size on both faces (module docstring).
    nn.AvgPool2d: _const(_avg_pool_log),
    nn.AdaptiveAvgPool2d: _const(_global_pool),
}


def rule_for(m: nn.Module) -> Rule:
    """The rule of ``m``'s type or its nearest base class in :data:`RULES`.

    Raises:
        NotImplementedError: a layer with no rule, so nothing is silently left out.
    """
    for cls in type(m).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule
    raise NotImplementedError(f"no Lipschitz rule for {type(m).__name__}")


def terms_of(m: nn.Module) -> list[Term]:
    """The search-time estimate of ``m`` as log-additive terms (children through the table)."""
    return rule_for(m).terms(m, terms_of)


def certified_log_bound(m: nn.Module, bound_of: BoundOf | None = None) -> float:
    """Certified log l2-Lipschitz bound of one layer (children through ``bound_of``, by default
    through the table itself)."""
    return rule_for(m).certified(m, bound_of if bound_of is not None else certified_log_bound)
