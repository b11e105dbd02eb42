"""Fused forward of a PC-DARTS search cell: the ops that share an input run as one batched op.

Computes exactly the function of :meth:`rarn.nas.supernet.SearchCell.forward` (Eq. (5) of RACL,
Dong et al., TPAMI 2025, with PC-DARTS partial channels, Xu et al. 2020, arXiv:1907.05737), but
instead of ~50 tiny ops per edge it processes all edges that leave the same input node at once:

* every edge from source ``i`` reads the same partial-channel slice ``x_i[:, :C/K]`` (sources
  ``s0`` and ``s1`` feed the same nodes and are batched together); per (kernel, dilation) kind,
  the edges' first depthwise convs become one conv with channel multiplier ``m`` (the number of
  edges per source: no copy of the input per edge), their pointwise convs one grouped 1 x 1 conv,
  their BNs one ``F.batch_norm`` over the concatenated channels, and so on for the second half
  of the sep convs;
* in training mode, pool -> BN(affine=False) gives the same output on every edge of a source
  (batch statistics of the same input), so it runs once per source; every edge's BN still
  receives the reference running-statistics update;
* the mixing ``node_j = sum_e beta_e shuffle(cat(sum_o w_eo o(x_a), x_b))`` is linear, so it is
  ``shuffle(cat(sum_e,o beta_e w_eo o(x_a), sum_e beta_e x_b))``: per source group one 1 x 1
  conv (a GEMM) per op kind for the mixed part, broadcast products for the bypass part, and one
  channel shuffle per node.

Everything runs in channels-last memory layout: oneDNN's depthwise convs and BN are several times
faster there on CPU than in NCHW (on these 2-core machines). Sub-tensors are taken with ``split``
and strided sub-sampling with a kernel-1 pool, never by slicing, so that gradients stay
channels-last too (a mixed-layout gradient sends BN backward to a ~5x slower kernel).

The parameters and buffers are read from the per-edge modules on every call (no second copy), so
``state_dict``, checkpoints and :mod:`rarn.lipschitz.estimator` see the same network. The plan
(which
modules to batch) is cached per cell and rebuilt when the cell's edge modules change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.nas.genotype import edge_endpoints
from rarn.nas.ops import PRIMITIVES, FactorizedReduce

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
    for edge in cell.edges:
        _check_ops(dict(zip(PRIMITIVES, edge.ops)), edge.stride)
    groups = []
    for sources in source_sets:
        targets = tuple(range(max(2, sources[-1] + 1), cell.nodes + 2))
        pairs = [(s, t) for s in sources for t in targets]
        edge_index = tuple(index[p] for p in pairs)
        ops = [dict(zip(PRIMITIVES, cell.edges[e].ops)) for e in edge_index]
        groups.append(_Group(sources, targets, edge_index, cell.edges[edge_index[0]].stride, ops))
    return _Plan(_plan_key(cell), groups, {})


def _check_ops(ops: dict[str, nn.Module], stride: int) -> None:
    """The module structure the fused forward reads (rarn.nas.ops, MixedOp)."""
    ok = all(isinstance(ops[n], nn.Sequential) and len(ops[n]) == 8 for n in _SEP)
    ok &= all(isinstance(ops[n], nn.Sequential) and len(ops[n]) == 4 for n in _DIL)
    ok &= all(
        isinstance(ops[n], nn.Sequential)
        and isinstance(ops[n][0], (nn.MaxPool2d, nn.AvgPool2d))
        and isinstance(ops[n][1], nn.BatchNorm2d)
        for n in _POOL
    )
    skip = ops["skip_connect"]
    ok &= isinstance(skip, nn.Identity) if stride == 1 else isinstance(skip, FactorizedReduce)
    if not ok:
        raise NotImplementedError("fused forward: unexpected op modules; use fused=False")


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


def _nhwc(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> its ``[B, H, W, C]`` view (contiguous for channels-last memory)."""
    return x.permute(0, 2, 3, 1)


def _nchw(x: Tensor) -> Tensor:
    """Inverse of :func:`_nhwc`."""
    return x.permute(0, 3, 1, 2)


def _repeat(x: Tensor, groups: int, m: int) -> Tensor:
    """``[B, G*c, H, W]`` -> ``[B, G*m*c, H, W]`` channels-last: each block of ``c`` channels
    repeated ``m`` times in place (channel order (g, repeat, ch)), in one copy."""
    y = _nhwc(x).unflatten(3, (groups, 1, -1)).expand(-1, -1, -1, -1, m, -1)
    return _nchw(y.flatten(3))


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
    y, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, bn0.eps)
    if bn0.track_running_stats:
        if bn0.momentum is None:
            raise NotImplementedError("fused forward needs BatchNorm with a float momentum")
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            # The kernel's biased variance, back from 1 / sqrt(var + eps); nn.BatchNorm2d's
            # running_var takes the unbiased one.
            var = (invstd.pow(-2) - bn0.eps).clamp_min_(0.0) * (n / max(n - 1, 1))
            c = bn0.num_features
            blocks = x.shape[1] // c
            mean = mean.view(blocks, 1, c).expand(-1, repeats, -1).reshape(-1)
            var = var.view(blocks, 1, c).expand(-1, repeats, -1).reshape(-1)
            mom = bn0.momentum
            rm = torch.cat([bn.running_mean for bn in bns]).mul_(1.0 - mom).add_(mean, alpha=mom)
            rv = torch.cat([bn.running_var for bn in bns]).mul_(1.0 - mom).add_(var, alpha=mom)
            torch._foreach_copy_([bn.running_mean for bn in bns], rm.split(c))
            torch._foreach_copy_([bn.running_var for bn in bns], rv.split(c))
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return y


def _depthwise(
    x: Tensor, convs: list[nn.Conv2d], m: int = 1, x_sub: Tensor | None = None
) -> Tensor:
    """The depthwise convs ``convs`` (same hyper-parameters, ``c`` channels each) of ``m`` edges
    per block of ``c`` input channels, as one conv with channel multiplier ``m``.

    Args:
        x: ``[B, G*c, H, W]``, ``G`` blocks (sources) of ``c`` channels.
        convs: ``G*m`` convs in (block, edge) order.
        m: edges per block.
        x_sub: ``x[:, :, ::2, ::2]``; a stride-2 dilation-2 conv with even padding reads only that
            sub-grid, so it runs there as a dense stride-1 conv (same sums; oneDNN's strided
            dilated depthwise kernels are several times slower on CPU).

    Returns:
        ``[B, G*c*m, H', W']``, channel order (block, ch, edge).
    """
    c0 = convs[0]
    weight = torch.cat([c.weight for c in convs])  # (block, edge, ch)
    if m > 1:
        G, c = len(convs) // m, c0.weight.shape[0]
        weight = weight.view(G, m, c, *weight.shape[1:]).transpose(1, 2).flatten(0, 2)
    stride, padding, dilation = c0.stride, c0.padding, c0.dilation
    if x_sub is not None and stride == (2, 2) and dilation == (2, 2):
        if padding[0] % 2 == 0 and padding[1] % 2 == 0:
            x, stride, dilation = x_sub, 1, 1
            padding = (padding[0] // 2, padding[1] // 2)
    return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])


def _pointwise(x: Tensor, convs: list[nn.Conv2d], m: int = 1) -> Tensor:
    """The 1 x 1 convs ``convs`` (``c`` -> ``c'``, in (block, edge) order) of the output of
    :func:`_depthwise` with multiplier ``m``; returns channel order (block, edge, ch')."""
    weight = torch.cat([c.weight for c in convs])  # [G*m*c', c, 1, 1]
    groups = len(convs) // m
    if m > 1:
        # Input channel (ch, t) of block s feeds edge t only: weight (x) [t == t'].
        c_out, c = convs[0].weight.shape[:2]
        eye = torch.eye(m, dtype=weight.dtype, device=weight.device)
        weight = torch.einsum("suab,ut->suabt", weight.view(groups, m, c_out, c), eye)
        weight = weight.reshape(groups * m * c_out, c * m, 1, 1)
    return F.conv2d(x, weight, None, 1, 0, 1, groups)


def _subsample(x: Tensor) -> Tensor:
    """``x[:, :, ::2, ::2]`` as a kernel-1 stride-2 average pool: the same values, but its backward
    keeps the channels-last layout (slicing's backward allocates a default-layout zero tensor, and
    mixed layouts send BN and ReLU backward to slow kernels)."""
    return F.avg_pool2d(x, 1, 2)


def _factorized_reduce(
    r: Tensor, r_sub: Tensor, S: int, frs: list[FactorizedReduce], training: bool
) -> Tensor:
    """Batched :class:`FactorizedReduce` of the ReLU'd partial channels ``r`` of ``S`` sources.

    Args:
        r: ``[B, S*c, H, W]``.
        r_sub: ``_subsample(r)``, what every edge's ``conv_1`` reads.
        S: number of sources.
        frs: the edges' modules, in (source, target) order.
        training: BN mode.

    Returns:
        ``[B, S*m*c, H', W']`` in edge order.
    """
    H, W = r.shape[2], r.shape[3]
    E = len(frs)
    # conv_2 reads x[:, :, 1:, 1:], zero-padded to even size, at stride 2.
    shifted = _subsample(F.pad(r, (-1, W % 2, -1, H % 2)))
    y1 = F.conv2d(r_sub, torch.cat([fr.conv_1.weight for fr in frs]), None, 1, 0, 1, S)
    y2 = F.conv2d(shifted, torch.cat([fr.conv_2.weight for fr in frs]), None, 1, 0, 1, S)
    # Per edge cat([conv_1, conv_2]): channel order (e, half, ch).
    y = torch.cat([_nhwc(y1).unflatten(3, (E, 1, -1)), _nhwc(y2).unflatten(3, (E, 1, -1))], dim=4)
    return _batch_norm(_nchw(y.flatten(3)), [fr.bn for fr in frs], training)


def _group_forward(
    group: _Group,
    xas: list[Tensor],
    xbs: list[Tensor] | None,
    w: Tensor,
    beta: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor | None]:
    """Contributions of ``group``'s edges to its target nodes, before the channel shuffle.

    Args:
        group: the edges leaving the sources.
        xas: the partial channels ``x[:, :c]`` of every source, ``[B, c, H, W]``.
        xbs: the bypass channels ``x[:, c:]`` of every source (``None`` when K = 1).
        w: op weights of the group's edges, ``[S*m, n_ops]`` in (source, target) order.
        beta: edge weights of the group's edges, ``[S*m]``.
        training: BN mode.

    Returns:
        The mixed part ``[B, m*c, H', W']`` (target-major channels) and the bypass part
        ``[B, H', W', m, C - c]`` (``None`` when K = 1) for each of the ``m`` targets.
    """
    S, m = len(group.sources), len(group.targets)
    c = xas[0].shape[1]
    ops = group.ops
    xa = xas[0] if S == 1 else torch.cat(xas, dim=1)  # (s, ch)
    r = F.relu(xa)
    r_sub = _subsample(r) if group.stride == 2 else None

    # Every sep / dil conv kind: one grouped dw conv, one grouped pw conv, one BN for all edges.
    outs = []
    for name in _SEP + _DIL:
        mods = [o[name] for o in ops]
        y = _depthwise(r, [mod[1] for mod in mods], m, r_sub)  # (s, ch, t)
        y = _pointwise(y, [mod[2] for mod in mods], m)  # (s, t, ch): one block per edge
        y = _batch_norm(y, [mod[3] for mod in mods], training)
        if name in _SEP:
            y = _depthwise(F.relu(y), [mod[5] for mod in mods])
            y = _pointwise(y, [mod[6] for mod in mods])
            y = _batch_norm(y, [mod[7] for mod in mods], training)
        outs.append(y)

    # Pools (+ BN): in training mode with batch statistics the output is the same on every edge
    # of a source, so it is computed once per source.
    pooled = torch.cat([ops[0][name][0](xa) for name in _POOL], dim=1)  # (kind, s, ch)
    pool_bns = [o[name][1] for name in _POOL for o in ops]
    shared_pools = training and not pool_bns[0].affine
    if shared_pools:
        pooled = _shared_batch_norm(pooled, pool_bns, m)
    else:
        pooled = _batch_norm(_repeat(pooled, 2 * S, m), pool_bns, training)

    # Rows of c channels: per-edge rows (kind, s, t) and per-source rows (kind, s), each weighted
    # by a column of coef = beta_e * w_eo.
    edge_parts, edge_cols = outs, [PRIMITIVES.index(n) for n in _SEP + _DIL]
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
        edge_parts.append(_factorized_reduce(r, r_sub, S, frs, training))
        edge_cols.append(skip_col)

    coef = (w * beta[:, None]).view(S, m, -1)
    eye = torch.eye(m, dtype=coef.dtype, device=coef.device)
    # mix[t, (kind, s, t')] = coef[s, t', kind] * [t == t']: an edge row feeds its own target.
    mats = [torch.einsum("tu,suk->tksu", eye, coef[:, :, edge_cols]).reshape(m, -1)]
    if src_parts:
        mats.append(coef[:, :, src_cols].permute(1, 2, 0).reshape(m, -1))  # [t, (kind, s)]
    mix = torch.cat(mats, dim=1)  # [m, N]
    # 1 x 1 convs over the rows with weight mix (x) I_c: GEMMs in channels-last layout, one per
    # part (no concatenated copy of the rows).
    eye_c = torch.eye(c, dtype=coef.dtype, device=coef.device)
    weight = torch.einsum("tn,ab->tanb", mix, eye_c).reshape(m * c, -1, 1, 1)
    parts = edge_parts + src_parts
    a = None
    for part, wp in zip(parts, weight.split([p.shape[1] for p in parts], dim=1)):
        y = F.conv2d(part, wp)
        a = y if a is None else a + y
    if xbs is None:
        return a, None

    # Bypass x_b (max-pooled on strided edges): sum_s beta[s, t] x_b[s] for every target t.
    beta = beta.view(S, m, 1)
    b = None
    for s, xb in enumerate(xbs):
        if group.stride != 1:
            xb = F.max_pool2d(xb, 2, 2, ceil_mode=True)
        xb = _nhwc(xb).unsqueeze(3)  # [B, H', W', 1, C - c]
        b = xb * beta[s] if b is None else torch.addcmul(b, xb, beta[s])
    return a, b


def _shuffle_node(a: Tensor, b: Tensor | None, k: int) -> Tensor:
    """``channel_shuffle(cat([a, b]), k)`` in one copy, channels-last.

    Args:
        a: the mixed part ``[B, c, H, W]``.
        b: the bypass part as ``[B, H, W, (k - 1) * c]``, or ``None`` when ``k == 1``.
        k: PC-DARTS K.
    """
    if b is None:
        return a
    c = a.shape[1]
    # Shuffled channel i*k + q holds channel q*c + i of cat([a, b]).
    y = torch.cat([_nhwc(a).unsqueeze(4), b.unflatten(3, (k - 1, c)).transpose(3, 4)], dim=4)
    return _nchw(y.flatten(3))


def fused_cell_forward(
    cell: nn.Module, s0: Tensor, s1: Tensor, op_weights: Tensor, edge_weights: Tensor
) -> Tensor:
    """The output of ``cell`` (a :class:`rarn.nas.supernet.SearchCell`), computed with batched ops.

    Same value, gradients and BN running-statistics updates as ``cell(s0, s1, op_weights,
    edge_weights)``, up to float rounding (the sums run in another order). Works in
    channels-last memory layout (oneDNN's depthwise convs and BN are several times faster there
    on CPU); the output is channels-last.

    Args:
        cell: the search cell whose modules hold the parameters.
        s0: output of the cell before the previous one, ``[B, C_pp, H, W]``.
        s1: output of the previous cell, ``[B, C_p, H, W]``.
        op_weights: op mixing weights ``[E, n_ops]`` (columns in ``PRIMITIVES`` order).
        edge_weights: PC-DARTS edge weights ``[E]``.

    Returns:
        ``[B, multiplier * C, H', W']``, the concatenated last ``multiplier`` states.
    """
    plan = _get_plan(cell)
    k = cell.edges[0].k
    training = cell.training
    cl = torch.channels_last
    states = [
        cell.preprocess0(s0.contiguous(memory_format=cl)),
        cell.preprocess1(s1.contiguous(memory_format=cl)),
    ]
    acc_a: Tensor | None = None  # [B, m*c, H, W]: mixed part for the remaining targets
    acc_b: Tensor | None = None  # [B, H, W, m, C - c]: bypass part for the remaining targets
    for g, group in enumerate(plan.groups):
        idx = _index(plan, g, group, op_weights.device)
        C = states[group.sources[0]].shape[1]
        c = C // k
        # split, not slicing, so that the gradients stay channels-last (see _subsample)
        parts = [
            states[s].split([c, C - c], dim=1) if k > 1 else (states[s],) for s in group.sources
        ]
        xas = [p[0] for p in parts]
        xbs = [p[1] for p in parts] if k > 1 else None
        w, beta = op_weights.index_select(0, idx), edge_weights.index_select(0, idx)
        a, b = _group_forward(group, xas, xbs, w, beta, training)
        if acc_a is not None:  # earlier groups' contributions to the same targets
            a = acc_a + a
            b = None if b is None else acc_b + b
        # The first target of this group has now received all its edges.
        if a.shape[1] > c:
            node_a, acc_a = a.split([c, a.shape[1] - c], dim=1)
        else:
            node_a, acc_a = a, None
        node_b = None
        if b is not None:
            if b.shape[3] > 1:
                node_b, acc_b = b.split([1, b.shape[3] - 1], dim=3)
            else:
                node_b, acc_b = b, None
            node_b = node_b.squeeze(3)
        states.append(_shuffle_node(node_a, node_b, k))
    return torch.cat(states[-cell.multiplier :], dim=1)
