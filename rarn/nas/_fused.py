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
faster there on CPU than in NCHW (on these 2-core machines); the batched kernels are in
:mod:`rarn.nas._fused_kernels`.

Which ops are batched how follows their *kind* in the op registry (:data:`rarn.space.ops.OPS`), so
a new op of a known kind is handled, and an op of a kind this path cannot batch, or whose modules
do not have its kind's structure, fails with a message naming it (use ``fused=False``).

The parameters and buffers are read from the per-edge modules on every call (no second copy), so
``state_dict``, checkpoints and :mod:`rarn.lipschitz.estimator` see the same network. The plan
(which modules to batch) is cached per cell and rebuilt when the cell's edge modules change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.nas._fused_kernels import (
    batch_norm,
    depthwise,
    factorized_reduce,
    nchw,
    nhwc,
    pointwise,
    repeat_blocks,
    shared_batch_norm,
    shuffle_node,
    subsample,
)
from rarn.space.genotype import edge_endpoints
from rarn.space.ops import OPS, PRIMITIVES, FactorizedReduce, ops_of_kind

__all__ = ["fused_cell_forward"]

_BATCHED = ("none", "pool", "skip", "sep", "dil")  # the op kinds this path knows how to batch
_SEP, _DIL, _POOL, _SKIP = (ops_of_kind(kind) for kind in ("sep", "dil", "pool", "skip"))


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
    other = [f"{n!r} (kind {OPS[n].kind!r})" for n in PRIMITIVES if OPS[n].kind not in _BATCHED]
    if other:
        raise NotImplementedError(
            f"fused forward cannot batch op {', '.join(other)}: it batches the op kinds "
            f"{', '.join(_BATCHED)}; use fused=False"
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


def _has_structure(kind: str, op: nn.Module, stride: int) -> bool:
    """Whether ``op`` has the module structure the batched kernels read for its kind."""
    if kind == "sep":  # (ReLU, depthwise, pointwise, BN) x 2
        return isinstance(op, nn.Sequential) and len(op) == 8
    if kind == "dil":  # ReLU, depthwise, pointwise, BN
        return isinstance(op, nn.Sequential) and len(op) == 4
    if kind == "pool":  # pool, BN (rarn.nas.supernet.MixedOp)
        return (
            isinstance(op, nn.Sequential)
            and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d))
            and isinstance(op[1], nn.BatchNorm2d)
        )
    if kind == "skip":
        return isinstance(op, nn.Identity if stride == 1 else FactorizedReduce)
    return True  # none: never evaluated


def _check_ops(ops: dict[str, nn.Module], stride: int) -> None:
    bad = [
        f"{n!r} (kind {OPS[n].kind!r})"
        for n, op in ops.items()
        if not _has_structure(OPS[n].kind, op, stride)
    ]
    if bad:
        raise NotImplementedError(
            f"fused forward: op {', '.join(bad)} does not have the module structure of its kind "
            "(see rarn.nas._fused._has_structure); use fused=False"
        )


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


@dataclass
class _Rows:
    """Inputs of the mixing GEMM: per-edge parts (channel blocks ``(kind, s, t)``) and
    per-source parts (blocks ``(kind, s)``, shared by all targets), with the op column of
    ``coef = beta_e * w_eo`` that weights each kind."""

    edge_parts: list[Tensor]
    edge_cols: list[int]
    src_parts: list[Tensor]
    src_cols: list[int]


def _conv_rows(group: _Group, r: Tensor, r_sub: Tensor | None, training: bool) -> _Rows:
    """Every sep / dil conv kind: one grouped dw conv, one grouped pw conv, one BN for all
    edges; the outputs are per-edge rows."""
    m = len(group.targets)
    rows = _Rows([], [], [], [])
    for name in _SEP + _DIL:
        mods = [o[name] for o in group.ops]
        y = depthwise(r, [mod[1] for mod in mods], m, r_sub)  # (s, ch, t)
        y = pointwise(y, [mod[2] for mod in mods], m)  # (s, t, ch): one block per edge
        y = batch_norm(y, [mod[3] for mod in mods], training)
        if name in _SEP:
            y = depthwise(F.relu(y), [mod[5] for mod in mods])
            y = pointwise(y, [mod[6] for mod in mods])
            y = batch_norm(y, [mod[7] for mod in mods], training)
        rows.edge_parts.append(y)
        rows.edge_cols.append(PRIMITIVES.index(name))
    return rows


def _pool_rows(rows: _Rows, group: _Group, xa: Tensor, training: bool) -> None:
    """Pools (+ BN). In training mode with batch statistics (affine=False) the output is the same
    on every edge of a source, so it is computed once per source (per-source rows)."""
    if not _POOL:
        return
    S, m, ops = len(group.sources), len(group.targets), group.ops
    pooled = torch.cat([ops[0][name][0](xa) for name in _POOL], dim=1)  # (kind, s, ch)
    pool_bns = [o[name][1] for name in _POOL for o in ops]
    cols = [PRIMITIVES.index(n) for n in _POOL]
    if training and not pool_bns[0].affine:
        rows.src_parts.append(shared_batch_norm(pooled, pool_bns, m))
        rows.src_cols += cols
    else:
        rows.edge_parts.append(
            batch_norm(repeat_blocks(pooled, len(_POOL) * S, m), pool_bns, training)
        )
        rows.edge_cols += cols


def _skip_rows(
    rows: _Rows, group: _Group, xa: Tensor, r: Tensor, r_sub: Tensor | None, training: bool
) -> None:
    """Identity on a source (per-source rows), or a batched FactorizedReduce per edge."""
    for name in _SKIP:
        col = PRIMITIVES.index(name)
        if group.stride == 1:
            rows.src_parts.append(xa)
            rows.src_cols.append(col)
        else:
            frs = [o[name] for o in group.ops]
            rows.edge_parts.append(factorized_reduce(r, r_sub, len(group.sources), frs, training))
            rows.edge_cols.append(col)


def _mix(rows: _Rows, coef: Tensor, c: int) -> Tensor:
    """``sum_kind coef * rows`` for every target: ``[B, m*c, H', W']`` (target-major channels).

    ``coef`` is ``[S, m, n_ops]``; the sum runs as 1 x 1 convs over the rows with weight
    ``mix (x) I_c`` (GEMMs in channels-last layout, one per part, no concatenated copy).
    Grouped (``coef`` ``[G, S, m, n_ops]``, the batch ``G`` stacked groups of ``B / G``): each
    group's rows mixed with its own weights, one batched GEMM per part."""
    lead, m = coef.shape[:-3], coef.shape[-2]
    eye = torch.eye(m, dtype=coef.dtype, device=coef.device)
    # mix[t, (kind, s, t')] = coef[s, t', kind] * [t == t']: an edge row feeds its own target.
    mats = [
        torch.einsum("tu,...suk->...tksu", eye, coef[..., rows.edge_cols]).reshape(*lead, m, -1)
    ]
    if rows.src_parts:  # [t, (kind, s)]
        mats.append(coef[..., rows.src_cols].movedim(-3, -1).reshape(*lead, m, -1))
    mix = torch.cat(mats, dim=-1)  # [m, N]
    eye_c = torch.eye(c, dtype=coef.dtype, device=coef.device)
    weight = torch.einsum("...tn,ab->...tanb", mix, eye_c).reshape(*lead, m * c, -1)
    parts = rows.edge_parts + rows.src_parts
    a = None
    for part, wp in zip(parts, weight.split([p.shape[1] for p in parts], dim=-1)):
        if lead:  # [G, B/G * H * W, C_p] @ [G, C_p, m*c]
            B, C_p, H, W = part.shape
            y = torch.bmm(nhwc(part).reshape(lead[0], -1, C_p), wp.transpose(1, 2))
            y = nchw(y.view(B, H, W, -1))
        else:
            y = F.conv2d(part, wp[:, :, None, None])
        a = y if a is None else a + y
    return a


def _bypass(group: _Group, xbs: list[Tensor], beta: Tensor) -> Tensor:
    """Bypass x_b (max-pooled on strided edges): ``sum_s beta[s, t] x_b[s]`` for every target
    ``t``, as ``[B, H', W', m, C - c]``; ``beta`` ``[S*m]``, or ``[G, S*m]`` for a batch of
    ``G`` stacked groups, each with its own."""
    G = beta.shape[0] if beta.dim() == 2 else 0
    beta = beta.view(*beta.shape[:-1], len(group.sources), len(group.targets), 1)
    b = None
    for s, xb in enumerate(xbs):
        if group.stride != 1:
            xb = F.max_pool2d(xb, 2, 2, ceil_mode=True)
        xb = nhwc(xb).unsqueeze(3)  # [B, H', W', 1, C - c]
        bs = beta[..., s, :, :]
        if G:  # [G, B/G, H', W', 1, C - c] times [G, 1, 1, 1, m, 1]
            xb, bs = xb.unflatten(0, (G, -1)), bs[:, None, None, None]
        b = xb * bs if b is None else torch.addcmul(b, xb, bs)
    return b if not G else b.flatten(0, 1)


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
        w: op weights of the group's edges, ``[S*m, n_ops]`` in (source, target) order
            (``[G, S*m, n_ops]`` for a grouped batch: :func:`fused_cell_forward`).
        beta: edge weights of the group's edges, ``[S*m]`` (``[G, S*m]``).
        training: BN mode.

    Returns:
        The mixed part ``[B, m*c, H', W']`` (target-major channels) and the bypass part
        ``[B, H', W', m, C - c]`` (``None`` when K = 1) for each of the ``m`` targets.
    """
    S, m = len(group.sources), len(group.targets)
    xa = xas[0] if S == 1 else torch.cat(xas, dim=1)  # (s, ch)
    r = F.relu(xa)
    r_sub = subsample(r) if group.stride == 2 else None
    rows = _conv_rows(group, r, r_sub, training)
    _pool_rows(rows, group, xa, training)
    _skip_rows(rows, group, xa, r, r_sub, training)
    coef = (w * beta[..., None]).view(*w.shape[:-2], S, m, -1)
    a = _mix(rows, coef, xas[0].shape[1])
    return a, None if xbs is None else _bypass(group, xbs, beta)


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
        op_weights: op mixing weights ``[E, n_ops]`` (columns in ``PRIMITIVES`` order), or
            ``[G, E, n_ops]``: the batch is then ``G`` groups of equal size stacked along dim 0,
            each mixed with its own weights (inside
            :func:`rarn.nas._fused_kernels.grouped_statistics`, each normalised with its own
            batch statistics too): ``G`` supernets' passes in one.
        edge_weights: PC-DARTS edge weights ``[E]`` (``[G, E]``).

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
        # split, not slicing, so that the gradients stay channels-last (see subsample)
        parts = [
            states[s].split([c, C - c], dim=1) if k > 1 else (states[s],) for s in group.sources
        ]
        xas = [p[0] for p in parts]
        xbs = [p[1] for p in parts] if k > 1 else None
        w, beta = op_weights.index_select(-2, idx), edge_weights.index_select(-1, idx)
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
        states.append(shuffle_node(node_a, node_b, k))
    return torch.cat(states[-cell.multiplier :], dim=1)
