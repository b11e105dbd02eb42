"""Certified Lipschitz upper bound of a discrete network, and an empirical lower bound.

RACL (spec §2.1 Eq. 2-3, §2.3) relates robustness to the l2 Lipschitz constant of the logits map
``x -> F(x)``. :func:`lipschitz_upper_bound` certifies it for a trained network in eval mode (BN
from running statistics): layers by the ``certified`` face of :mod:`rarn.lipschitz.rules`, and
the network's structure by the rules here, which the search never needs:

* a DARTS cell exactly through its DAG (node: log-sum-exp over its two inputs of op bound +
  input bound; output: concat, ``sqrt(sum of squares)``), not the looser per-node product of the
  search's constraint;
* residual blocks of the baselines: ``Lip(f + g) <= Lip(f) + Lip(g)``;
* networks whose forward runs their children in order: a chain.

:func:`local_lipschitz` is an empirical *lower* bound of the same constant from input gradients
on data, so ``log(local) <= upper`` always holds.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.lipschitz.rules import certified_log_bound, chain_log_bound
from rarn.models.baselines import WideBasicBlock
from rarn.models.common import eval_mode, logit_margin
from rarn.models.darts import Cell, Network

__all__ = ["lipschitz_upper_bound", "local_lipschitz", "module_log_lipschitz"]


def _lse(values: list[float]) -> float:
    """log(sum(exp(v))) that tolerates -inf entries."""
    m = max(values)
    if m == float("-inf"):
        return m
    return m + math.log(sum(math.exp(v - m) for v in values))


def _cell_log_bound(cell: Cell, l0: float, l1: float) -> float:
    """Bound of a cell's output given the bounds ``l0``, ``l1`` of its inputs (w.r.t. x)."""
    states = [
        l0 + module_log_lipschitz(cell.preprocess0),
        l1 + module_log_lipschitz(cell.preprocess1),
    ]
    for j in range(cell.nodes):
        terms = [
            module_log_lipschitz(cell.ops[k]) + states[cell.indices[k]] for k in (2 * j, 2 * j + 1)
        ]
        states.append(_lse(terms))
    # Concat: ||[f_1; ...; f_m]|| <= sqrt(sum_k Lip(f_k)^2).
    return 0.5 * _lse([2.0 * states[i] for i in cell.concat])


def _network_log_bound(net: Network) -> float:
    if net.stem_type == "cifar":
        s0 = s1 = module_log_lipschitz(net.stem)
    else:
        s0 = module_log_lipschitz(net.stem0)
        s1 = s0 + module_log_lipschitz(net.stem1)
    for cell in net.cells:
        s0, s1 = s1, _cell_log_bound(cell, s0, s1)
    # Global average pooling has norm <= 1; the auxiliary head is not part of the eval output.
    return s1 + module_log_lipschitz(net.classifier)


def _torchvision_bound(m: nn.Module) -> float | None:
    """torchvision baselines: residual blocks (branch + shortcut) and the networks (chains)."""
    if "torchvision" not in sys.modules:  # then m cannot be a torchvision module
        return None
    from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
    from torchvision.models.resnet import BasicBlock, ResNet

    if isinstance(m, ResNet | MobileNetV2):
        # Both forwards run their children in registration order; the global average pool
        # between them (or a child) has l2 norm <= 1.
        return chain_log_bound(list(m.children()), module_log_lipschitz)
    if isinstance(m, BasicBlock):  # relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))
        branch = chain_log_bound([m.conv1, m.bn1, m.conv2, m.bn2], module_log_lipschitz)
        short = module_log_lipschitz(m.downsample) if m.downsample is not None else 0.0
        return _lse([branch, short])
    if isinstance(m, InvertedResidual):
        branch = module_log_lipschitz(m.conv)
        return _lse([branch, 0.0]) if m.use_res_connect else branch
    return None


def _structure_bound(m: nn.Module) -> float | None:
    """Bound of a network or residual block (None: a plain layer, for the rule table)."""
    if isinstance(m, Network):
        return _network_log_bound(m)
    if isinstance(m, WideBasicBlock):
        pre = module_log_lipschitz(m.pre)
        branch = module_log_lipschitz(m.branch)
        if m.shortcut is None:  # x + branch(pre(x))
            return _lse([pre + branch, 0.0])
        return pre + _lse([branch, module_log_lipschitz(m.shortcut)])
    return _torchvision_bound(m)


def module_log_lipschitz(m: nn.Module) -> float:
    """Certified log l2-Lipschitz bound of one module in eval mode.

    Networks and residual blocks by their structure (this module), every other layer by the
    ``certified`` face of its rule in :data:`rarn.lipschitz.rules.RULES`, whose children come
    back here (so a chain may hold residual blocks, as a WideResNet does).

    Raises:
        NotImplementedError: a layer with no rule, so nothing is silently left out.
    """
    bound = _structure_bound(m)
    return bound if bound is not None else certified_log_bound(m, module_log_lipschitz)


@torch.no_grad()
def lipschitz_upper_bound(model: nn.Module) -> float:
    """Certified log upper bound of the l2 Lipschitz constant of ``x -> logits`` in eval mode.

    Args:
        model: a :class:`~rarn.models.darts.Network` or a baseline from
            :func:`~rarn.models.darts.build_network`; BN layers use their running statistics
            (train the network, or the bound reflects initial statistics).

    Returns:
        ``log`` of the bound (networks reach ``e^50`` and beyond, so only the log is usable).
    """
    return float(module_log_lipschitz(model))


def local_lipschitz(model: nn.Module, x: Tensor, y: Tensor, *, objective: str = "margin") -> float:
    """Empirical local Lipschitz estimate: ``max_i ||grad_x f(x_i)||_2 / sqrt(2)`` over a batch.

    ``f`` is the logit margin ``z_y - max_{j != y} z_j`` (``objective="margin"``) or the
    cross-entropy loss (``"ce"``). Both have gradient norm at most ``sqrt(2)`` with respect to the
    logits, so the value is a *lower* bound of the logits map's l2 Lipschitz constant, directly
    comparable with ``exp(lipschitz_upper_bound(model))``. Computed in eval mode.

    Args:
        model: the network.
        x: inputs ``(B, C, H, W)``.
        y: labels ``(B,)``.
        objective: ``margin`` or ``ce``.

    Returns:
        The estimate (not its log).
    """
    if objective not in ("margin", "ce"):
        raise ValueError(f"unknown objective {objective!r}; known: margin, ce")
    with eval_mode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        z = model(x).float()  # (B, K)
        if objective == "ce":
            f = F.cross_entropy(z, y, reduction="sum")
        else:
            f = -logit_margin(z, y).sum()
        # Eval mode: samples are independent, so the gradient of the sum is per-sample.
        (g,) = torch.autograd.grad(f, x)
    return float(g.flatten(1).norm(dim=1).max()) / math.sqrt(2.0)
