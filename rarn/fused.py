"""Fused forward of a PC-DARTS search cell: the ops that share an input run as one batched op.

Computes exactly the function of :meth:`rarn.supernet.SearchCell.forward` (Eq. (5) of RACL,
Dong et al., TPAMI 2025, with PC-DARTS partial channels, Xu et al. 2020, arXiv:1907.05737), but
instead of ~50 tiny ops per edge it processes all edges that leave the same input node at once:

* every edge from source ``i`` reads the same partial-channel slice ``x_i[:, :C/K]``; the edges'
  depthwise convs of one (kernel, dilation) kind become one grouped conv over the concatenated
  weights, the pointwise convs of all kinds one grouped 1 x 1 conv, the BNs one ``F.batch_norm``
  over the concatenated channels (sources ``s0`` and ``s1`` are batched together, they feed the
  same nodes);
* in training mode, pool -> BN(affine=False) gives the same output on every edge of a source
  (batch statistics of the same input), so it runs once per source; every edge's BN still
  receives the reference running-statistics update;
* the mixing ``node_j = sum_e beta_e shuffle(cat(sum_o w_eo o(x_a), x_b))`` is linear, so it is
  ``shuffle(cat(sum_e,o beta_e w_eo o(x_a), sum_e beta_e x_b))``: one small matmul per source
  group for the mixed part, one for the bypass part, one channel shuffle per node.

The parameters and buffers are read from the per-edge modules on every call (no second copy), so
``state_dict``, checkpoints and :mod:`rarn.lipschitz` see the same network. The plan (which
modules to batch) is cached per cell and rebuilt when the cell's edge modules change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.genotype import edge_endpoints
from rarn.search_space import PRIMITIVES, FactorizedReduce

__all__ = ["fused_cell_forward"]

_EXPECTED_OPS = {
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
}
_SEP = ("sep_conv_3x3", "sep_conv_5x5")
_DIL = ("dil_conv_3x3", "dil_conv_5x5")
_POOL = ("max_pool_3x3", "avg_pool_3x3")


@dataclass
class _Group:
    """The edges leaving ``sources`` (which all feed the same ``targets``), in (source, target)
    order; ``ops[e][name]`` is edge ``e``'s op module."""

    sources: tuple[int, ...]
    targets: tuple[int, ...]
    edge_index: tuple[int, ...]  # global edge index of every (source, target) pair
    stride: int
    ops: list[dict[str, nn.Module]]


@dataclass
class _Plan:
    key: tuple[int, ...]
    groups: list[_Group]
    index_cache: dict[tuple[int, torch.device], Tensor]


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _build_plan(cell: nn.Module) -> _Plan:
    if set(PRIMITIVES) != _EXPECTED_OPS:
        raise NotImplementedError(
            f"fused forward supports the DARTS 8-op space, got {PRIMITIVES}; use fused=False"
        )
    endpoints = edge_endpoints(cell.nodes)
    index = {pair: e for e, pair in enumerate(endpoints)}
    # s0 and s1 feed the same nodes and have the same shape: one group; node i one group each.
    source_sets = [(0, 1)] + [(i,) for i in range(2, cell.nodes + 1)]
    groups = []
    for sources in source_sets:
        targets = tuple(range(max(2, sources[-1] + 1), cell.nodes + 2))
        pairs = [(s, t) for s in sources for t in targets]
        edge_index = tuple(index[p] for p in pairs)
        ops = [dict(zip(PRIMITIVES, cell.edges[e].ops)) for e in edge_index]
        groups.append(_Group(sources, targets, edge_index, cell.edges[edge_index[0]].stride, ops))
    return _Plan(_plan_key(cell), groups, {})


def _plan_key(cell: nn.Module) -> tuple[int, ...]:
    return (id(cell.edges), *(id(op) for edge in cell.edges for op in edge.ops))


def _get_plan(cell: nn.Module) -> _Plan:
    plan = _PLANS.get(cell)
    if plan is None or plan.key != _plan_key(cell):
        plan = _build_plan(cell)
        _PLANS[cell] = plan
    return plan


def _index(plan: _Plan, g: int, group: _Group, device: torch.device) -> Tensor:
    key = (g, device)
    idx = plan.index_cache.get(key)
    if idx is None:
        idx = torch.tensor(group.edge_index, dtype=torch.long, device=device)
        plan.index_cache[key] = idx
    return idx


def _repeat(x: Tensor, groups: int, m: int, channels_last: bool) -> Tensor:
    """``[B, G*c, H, W]`` -> ``[B, G*m*c, H, W]``: each block of ``c`` channels repeated ``m``
    times in place (channel order (g, repeat, ch)), in one copy to the requested layout."""
    B, C, H, W = x.shape
    if not channels_last:
        if m == 1:
            return x
        x = x.reshape(B, groups, 1, C // groups * H * W).expand(-1, -1, m, -1)
        return x.reshape(B, -1, H, W)
    x = x.unflatten(1, (groups, 1, C // groups)).permute(0, 4, 5, 1, 2, 3)  # [B, H, W, G, 1, c]
    x = x.expand(-1, -1, -1, -1, m, -1).reshape(B, H, W, groups * m * C // groups)
    return x.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory


def _batch_norm(x: Tensor, bns: list[nn.Module], training: bool) -> Tensor:
    """One ``F.batch_norm`` for the BNs ``bns`` whose channels are concatenated in ``x``.

    In training mode the running statistics of every BN are updated exactly as
    ``nn.BatchNorm2d.forward`` would (same kernel on a concatenated copy, copied back).
    """
    bn0 = bns[0]
    weight = bias = None
    if bn0.affine:
        weight = torch.cat([bn.weight for bn in bns])
        bias = torch.cat([bn.bias for bn in bns])
    if not bn0.track_running_stats:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn0.eps)
    mean = torch.cat([bn.running_mean for bn in bns])
    var = torch.cat([bn.running_var for bn in bns])
    if not training:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, bn0.eps)
    if bn0.momentum is None:
        raise NotImplementedError("fused forward needs BatchNorm with a float momentum")
    y = F.batch_norm(x, mean, var, weight, bias, True, bn0.momentum, bn0.eps)
    with torch.no_grad():
        n = bn0.num_features
        torch._foreach_copy_([bn.running_mean for bn in bns], mean.split(n))
        torch._foreach_copy_([bn.running_var for bn in bns], var.split(n))
        torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return y


def _shared_batch_norm(x: Tensor, bns: list[nn.Module], repeats: int) -> Tensor:
    """Training-mode BN(affine=False) of ``x`` (blocks of ``c`` channels) whose output is shared
    by ``repeats`` BNs per block, ``bns`` in (block, repeat) order; updates all their running
    statistics with the batch statistics of their block, as ``nn.BatchNorm2d`` does."""
    bn0 = bns[0]
    y = F.batch_norm(x, None, None, None, None, True, 0.0, bn0.eps)
    if bn0.track_running_stats:
        if bn0.momentum is None:
            raise NotImplementedError("fused forward needs BatchNorm with a float momentum")
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            # nn.BatchNorm2d: running_var uses the unbiased batch variance.
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1 if n > 1 else 0)
            c = bn0.num_features
            blocks = x.shape[1] // c
            mean = mean.view(blocks, 1, c).expand(-1, repeats, -1).reshape(-1)
            var = var.view(blocks, 1, c).expand(-1, repeats, -1).reshape(-1)
            rm = torch.cat([bn.running_mean for bn in bns])
            rv = torch.cat([bn.running_var for bn in bns])
            mom = bn0.momentum
            rm = rm.mul_(1.0 - mom).add_(mean, alpha=mom)
            rv = rv.mul_(1.0 - mom).add_(var, alpha=mom)
            torch._foreach_copy_([bn.running_mean for bn in bns], rm.split(c))
            torch._foreach_copy_([bn.running_var for bn in bns], rv.split(c))
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return y


def _depthwise(x: Tensor, convs: list[nn.Conv2d], x_sub: Tensor | None = None) -> Tensor:
    """The depthwise convs ``convs`` (same hyper-parameters) of consecutive channel blocks.

    ``x_sub`` is ``x[:, :, ::2, ::2]``: a stride-2 dilation-2 conv with even padding reads only
    that sub-grid, so it runs there as a dense stride-1 conv (same sums; oneDNN's strided dilated
    depthwise kernels are several times slower on CPU).
    """
    c0 = convs[0]
    weight = torch.cat([c.weight for c in convs])
    if x_sub is not None and c0.stride == (2, 2) and c0.dilation == (2, 2):
        ph, pw = c0.padding
        if ph % 2 == 0 and pw % 2 == 0:
            return F.conv2d(x_sub, weight, None, 1, (ph // 2, pw // 2), 1, x.shape[1])
    return F.conv2d(x, weight, None, c0.stride, c0.padding, c0.dilation, x.shape[1])


def _pointwise(x: Tensor, convs: list[nn.Conv2d]) -> Tensor:
    """The 1 x 1 convs ``convs`` (``c`` -> ``c``) of consecutive channel blocks."""
    weight = torch.cat([c.weight for c in convs])
    return F.conv2d(x, weight, None, convs[0].stride, 0, 1, len(convs))


def _factorized_reduce(
    r: Tensor, S: int, m: int, frs: list[FactorizedReduce], training: bool, channels_last: bool
) -> Tensor:
    """Batched :class:`FactorizedReduce` of the (already ReLU'd) sources in ``r`` (S blocks),
    ``m`` edges per source; returns ``[B, S*m*c, H', W']`` in edge order."""
    H, W = r.shape[2], r.shape[3]
    u1 = r[:, :, ::2, ::2]
    shifted = r[:, :, 1:, 1:]
    if H % 2 or W % 2:
        shifted = F.pad(shifted, (0, W % 2, 0, H % 2))
    u2 = shifted[:, :, ::2, ::2]
    c = r.shape[1] // S
    # (source, half, ch) so that each edge's two convs read consecutive blocks.
    parts = []
    for s in range(S):
        parts += [u1[:, s * c : (s + 1) * c], u2[:, s * c : (s + 1) * c]]
    u = _repeat(torch.cat(parts, dim=1), S, m, channels_last)
    weight = torch.cat([w for fr in frs for w in (fr.conv_1.weight, fr.conv_2.weight)])
    y = F.conv2d(u, weight, None, 1, 0, 1, 2 * len(frs))
    return _batch_norm(y, [fr.bn for fr in frs], training)


def _group_forward(
    group: _Group,
    xs: list[Tensor],
    w: Tensor,
    beta: Tensor,
    k: int,
    training: bool,
    channels_last: bool,
) -> tuple[Tensor, Tensor | None]:
    """Contributions of ``group``'s edges to its target nodes, before the channel shuffle.

    Args:
        group: the edges leaving ``xs``.
        xs: the source states, ``[B, C, H, W]`` each.
        w: op weights of the group's edges, ``[S*m, n_ops]`` in (source, target) order.
        beta: edge weights of the group's edges, ``[S*m]``.
        k: PC-DARTS K.
        training: BN mode.
        channels_last: run the conv path in channels-last memory layout.

    Returns:
        The mixed-op part ``[B, m, c, H', W']`` and the bypass part ``[B, m, C - c, H', W']``
        (``None`` when ``k == 1``) for each of the ``m`` targets.
    """
    S, m = len(group.sources), len(group.targets)
    B, C, H, W = xs[0].shape
    c = C // k
    E = S * m
    ops = group.ops
    xa = xs[0][:, :c] if S == 1 else torch.cat([x[:, :c] for x in xs], dim=1)  # (s, ch)
    r = F.relu(xa)
    r_rep = _repeat(r, S, m, channels_last)  # (s, t, ch): one block of c channels per edge
    r_sub = _repeat(r[:, :, ::2, ::2], S, m, channels_last) if group.stride == 2 else None

    # First stage of the sep convs and the dil convs: a dw conv per kind, one pw conv, one BN.
    kinds = _SEP + _DIL
    dw = [_depthwise(r_rep, [o[name][1] for o in ops], r_sub) for name in kinds]
    Ho, Wo = dw[0].shape[2], dw[0].shape[3]
    z = _pointwise(torch.cat(dw, dim=1), [o[name][2] for name in kinds for o in ops])
    t1 = _batch_norm(z, [o[name][3] for name in kinds for o in ops], training)
    # Second stage of the sep convs.
    u = F.relu(t1[:, : 2 * E * c])
    dw2 = [
        _depthwise(u[:, i * E * c : (i + 1) * E * c], [o[name][5] for o in ops])
        for i, name in enumerate(_SEP)
    ]
    z2 = _pointwise(torch.cat(dw2, dim=1), [o[name][6] for name in _SEP for o in ops])
    t2 = _batch_norm(z2, [o[name][7] for name in _SEP for o in ops], training)

    # Pools (+ BN): in training mode with batch statistics the output is the same on every edge
    # of a source, so it is computed once per source.
    pooled = torch.cat([ops[0][name][0](xa) for name in _POOL], dim=1)  # (kind, s, ch)
    pool_bns = [o[name][1] for name in _POOL for o in ops]
    shared_pools = training and not pool_bns[0].affine
    if shared_pools:
        pooled = _shared_batch_norm(pooled, pool_bns, m)
    else:
        pooled = _batch_norm(_repeat(pooled, 2 * S, m, channels_last), pool_bns, training)

    # Rows of c channels: per-edge rows (kind, s, t) and per-source rows (kind, s), each weighted
    # by a column of coef = beta_e * w_eo.
    edge_parts, edge_cols = [t2, t1[:, 2 * E * c :]], [PRIMITIVES.index(n) for n in kinds]
    src_parts: list[Tensor] = []
    src_cols: list[int] = []
    pool_cols = [PRIMITIVES.index(n) for n in _POOL]
    if shared_pools:
        src_parts.append(pooled)
        src_cols += pool_cols
    else:
        edge_parts.append(pooled)
        edge_cols += pool_cols
    skip_col = PRIMITIVES.index("skip_connect")
    if group.stride == 1:
        src_parts.append(xa)
        src_cols.append(skip_col)
    else:
        frs = [o["skip_connect"] for o in ops]
        edge_parts.append(_factorized_reduce(r, S, m, frs, training, channels_last))
        edge_cols.append(skip_col)

    coef = (w * beta[:, None]).view(S, m, -1)
    eye = torch.eye(m, dtype=coef.dtype, device=coef.device)
    # mix[t, (kind, s, t')] = coef[s, t', kind] * [t == t']: an edge row feeds its own target.
    mats = [torch.einsum("tu,suk->tksu", eye, coef[:, :, edge_cols]).reshape(m, -1)]
    if src_parts:
        mats.append(coef[:, :, src_cols].permute(1, 2, 0).reshape(m, -1))  # [t, (kind, s)]
    mix = torch.cat(mats, dim=1)
    rows = torch.cat(edge_parts + src_parts, dim=1)  # NCHW unless every part is channels-last
    if not rows.is_contiguous():
        rows = rows.contiguous()
    a = torch.matmul(mix, rows.view(B, -1, c * Ho * Wo)).view(B, m, c, Ho, Wo)
    if c == C:
        return a, None

    # Bypass x_b (max-pooled on strided edges): sum_s beta[s, t] x_b[s] for every target t.
    if S == 1:
        xb = xs[0][:, c:]
        if group.stride != 1:
            xb = F.max_pool2d(xb, 2, 2, ceil_mode=True)
        b = beta.view(1, m, 1, 1, 1) * xb.unsqueeze(1)
    else:
        xb = torch.cat([x[:, c:] for x in xs], dim=1)
        if group.stride != 1:
            xb = F.max_pool2d(xb, 2, 2, ceil_mode=True)
        b = torch.matmul(beta.view(S, m).t(), xb.reshape(B, S, -1))
        b = b.view(B, m, C - c, Ho, Wo)
    return a, b


def _shuffle_node(a: Tensor, b: Tensor | None, k: int) -> Tensor:
    """``channel_shuffle(cat([a, b]), k)`` in one copy (``a``: ``[B, c, H, W]``)."""
    if b is None:
        return a
    B, c, H, W = a.shape
    out = torch.cat([a.unsqueeze(2), b.unflatten(1, (k - 1, c)).transpose(1, 2)], dim=2)
    return out.view(B, c * k, H, W)


def fused_cell_forward(
    cell: nn.Module,
    s0: Tensor,
    s1: Tensor,
    op_weights: Tensor,
    edge_weights: Tensor,
    channels_last: bool = True,
) -> Tensor:
    """The output of ``cell`` (a :class:`rarn.supernet.SearchCell`), computed with batched ops.

    Same value, gradients and BN running-statistics updates as ``cell(s0, s1, op_weights,
    edge_weights)``, up to float rounding (the sums run in another order).

    Args:
        cell: the search cell whose modules hold the parameters.
        s0: output of the cell before the previous one, ``[B, C_pp, H, W]``.
        s1: output of the previous cell, ``[B, C_p, H, W]``.
        op_weights: op mixing weights ``[E, n_ops]`` (columns in ``PRIMITIVES`` order).
        edge_weights: PC-DARTS edge weights ``[E]``.
        channels_last: run the batched convs and BNs in channels-last memory layout (faster
            depthwise convs on CPU); node states stay in the default layout.

    Returns:
        ``[B, multiplier * C, H', W']``, the concatenated last ``multiplier`` states.
    """
    plan = _get_plan(cell)
    k = cell.edges[0].k
    training = cell.training
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    acc_a: Tensor | None = None
    acc_b: Tensor | None = None
    for g, group in enumerate(plan.groups):
        idx = _index(plan, g, group, op_weights.device)
        xs = [states[s] for s in group.sources]
        a, b = _group_forward(
            group,
            xs,
            op_weights.index_select(0, idx),
            edge_weights.index_select(0, idx),
            k,
            training,
            channels_last,
        )
        if acc_a is None:
            acc_a, acc_b = a, b
        else:
            acc_a = acc_a[:, 1:] + a
            acc_b = None if b is None else acc_b[:, 1:] + b
        # The first target of this group has now received all its edges.
        states.append(_shuffle_node(acc_a[:, 0], None if acc_b is None else acc_b[:, 0], k))
    return torch.cat(states[-cell.multiplier :], dim=1)
