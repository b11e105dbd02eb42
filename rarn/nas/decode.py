"""Decoding: from op scores or architecture distributions to a discrete :class:`Genotype` (spec
§2.8).

* :func:`derive_genotype` is the DARTS/PC-DARTS rule on given scores: per node the two strongest
  incoming edges, each with its best non-``none`` op.
* :func:`decode` turns the supernet's log-normal architecture distributions into scores by one of
  :data:`DECODERS` (eta-lower quantile, median, or a majority vote over samples).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import get_args

import torch
from torch import Tensor

from rarn.config import DecodeRule
from rarn.nas.supernet import ArchSample, Supernet, node_softmax
from rarn.space.genotype import Genotype, edge_endpoints
from rarn.space.ops import PARAMETRIC, PRIMITIVES

__all__ = [
    "DECODERS",
    "MAGNITUDE_DECODERS",
    "PERTURBATION_DECODERS",
    "cap_parameter_free",
    "decode",
    "derive_genotype",
    "quantile_logits",
]


def _derive_cell(op_scores: Tensor, edge_weights: Tensor, nodes: int) -> list[tuple[str, int]]:
    none = PRIMITIVES.index("none")
    scores = op_scores.detach().double().clone()
    scores[:, none] = float("-inf")
    best_score, best_op = scores.max(dim=1)
    strength = best_score.exp() * edge_weights.detach().double()
    pairs: list[tuple[str, int]] = []
    start = 0
    for j in range(nodes):
        n_in = j + 2
        s = strength[start : start + n_in]
        # Stable top-2 (ties broken towards the lower input index).
        top = sorted(range(n_in), key=lambda i: (-float(s[i]), i))[:2]
        for i in sorted(top):
            pairs.append((PRIMITIVES[int(best_op[start + i])], i))
        start += n_in
    return pairs


def derive_genotype(
    normal_scores: Tensor,
    normal_edges: Tensor,
    reduce_scores: Tensor,
    reduce_edges: Tensor,
    nodes: int = 4,
) -> Genotype:
    """Decode per-op log-scores ``[E, n_ops]`` and edge weights ``[E]`` into a :class:`Genotype`.

    Args:
        normal_scores: log op scores of the normal cell, columns in ``PRIMITIVES`` order
            (e.g. ``log_softmax`` of the eta-lower quantiles of the op distributions).
        normal_edges: per-edge weights (e.g. PC-DARTS edge normalisation), positive.
        reduce_scores, reduce_edges: the same for the reduction cell.
        nodes: intermediate nodes per cell.

    Returns:
        The genotype: per node the two strongest incoming edges, each with its best non-``none``
        op; the edge strength is ``exp(op score) * edge weight`` (PC-DARTS).
    """
    E = sum(j + 2 for j in range(nodes))
    for name, t, shape in (
        ("normal_scores", normal_scores, (E, len(PRIMITIVES))),
        ("reduce_scores", reduce_scores, (E, len(PRIMITIVES))),
        ("normal_edges", normal_edges, (E,)),
        ("reduce_edges", reduce_edges, (E,)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    concat = tuple(range(2, nodes + 2))
    return Genotype(
        normal=_derive_cell(normal_scores, normal_edges, nodes),
        normal_concat=concat,
        reduce=_derive_cell(reduce_scores, reduce_edges, nodes),
        reduce_concat=concat,
    )


def _quantile_scores(mu: ArchSample, sigma: ArchSample, z: float, nodes: int) -> tuple[Tensor, ...]:
    q = ArchSample(*(m - z * s for m, s in zip(mu.as_tuple(), sigma.as_tuple())))
    return (
        torch.log_softmax(q.normal, -1),
        node_softmax(q.normal_edges, nodes),
        torch.log_softmax(q.reduce, -1),
        node_softmax(q.reduce_edges, nodes),
    )


def quantile_logits(model: Supernet, eta: float) -> ArchSample:
    """The eta-lower quantile ``mu - Phi^{-1}(eta) sigma`` of every architecture logit (spec
    §2.8): the logits in which the distributions' confidence counts."""
    from scipy.stats import norm

    z = float(norm.ppf(eta))
    with torch.no_grad():
        mu, sigma = model.arch.mu().as_tuple(), model.arch.sigma().as_tuple()
        return ArchSample(*(m - z * s for m, s in zip(mu, sigma)))


def cap_parameter_free(
    genotype: Genotype, op_scores: Mapping[str, Tensor], max_free: int
) -> Genotype:
    """P-DARTS's cap (Chen et al. 2019, arXiv:1904.12760): at most ``max_free`` parameter-free
    edges (skip, pools) per cell; the lowest-scored of the others take their edge's best
    convolution by ``op_scores`` (per cell type ``[E, n_ops]``, higher is better)."""
    index = {end: e for e, end in enumerate(edge_endpoints(genotype.nodes))}
    conv = [i for i, p in enumerate(PRIMITIVES) if p in PARAMETRIC]
    cells = {}
    for cell in ("normal", "reduce"):
        pairs = list(getattr(genotype, cell))
        scores = op_scores[cell].detach().double()
        free = [
            (float(scores[index[(i, k // 2 + 2)], PRIMITIVES.index(op)]), k)
            for k, (op, i) in enumerate(pairs)
            if op not in PARAMETRIC
        ]
        for _, k in sorted(free)[: max(0, len(free) - max_free)]:
            op, i = pairs[k]
            row = scores[index[(i, k // 2 + 2)], conv]
            pairs[k] = (PRIMITIVES[conv[int(row.argmax())]], i)
        cells[cell] = pairs
    g = genotype
    return Genotype(cells["normal"], g.normal_concat, cells["reduce"], g.reduce_concat)


def decode(
    model: Supernet,
    mode: str = "quantile",
    eta: float = 0.9,
    samples: int = 100,
    generator: torch.Generator | None = None,
) -> Genotype:
    """Decode the architecture distributions into a genotype.

    Args:
        model: the supernet.
        mode: ``quantile`` (op score = eta-lower quantile ``mu - Phi^{-1}(eta) sigma``),
            ``median`` (``mu``), or ``sample`` (majority vote per node over ``samples`` draws).
        eta: confidence level of the quantile.
        samples: draws for ``sample``.
        generator: RNG for ``sample``.
    """
    from scipy.stats import norm

    arch = model.arch
    with torch.no_grad():
        mu, sigma = arch.mu(), arch.sigma()
        if mode in ("quantile", "median"):
            z = float(norm.ppf(eta)) if mode == "quantile" else 0.0
            n_s, n_e, r_s, r_e = _quantile_scores(mu, sigma, z, arch.nodes)
            return derive_genotype(n_s, n_e, r_s, r_e, arch.nodes)
        if mode in PERTURBATION_DECODERS:
            raise ValueError(
                f"decode mode {mode!r} needs the supernet's validation data: "
                "rarn.nas.search.RACLSearch.decode(mode, data)"
            )
        if mode != "sample":
            raise KeyError(f"unknown decode mode {mode!r}; known: {', '.join(DECODERS)}")
        draws = arch.sample(generator, n=samples)
        votes: list[Counter] = [Counter() for _ in range(2 * arch.nodes)]
        for s in range(samples):
            one = ArchSample(*(t[s] for t in draws.as_tuple()))
            g = derive_genotype(
                torch.log_softmax(one.normal, -1),
                node_softmax(one.normal_edges, arch.nodes),
                torch.log_softmax(one.reduce, -1),
                node_softmax(one.reduce_edges, arch.nodes),
                arch.nodes,
            )
            for j in range(arch.nodes):
                votes[j][g.normal[2 * j : 2 * j + 2]] += 1
                votes[arch.nodes + j][g.reduce[2 * j : 2 * j + 2]] += 1
        pick = [v.most_common(1)[0][0] for v in votes]
        concat = tuple(range(2, arch.nodes + 2))
        normal = tuple(p for node in pick[: arch.nodes] for p in node)
        reduce = tuple(p for node in pick[arch.nodes :] for p in node)
        return Genotype(normal, concat, reduce, concat)


DECODERS: tuple[str, ...] = get_args(DecodeRule)  # the config's Literal is the one list
PERTURBATION_DECODERS: tuple[str, ...] = tuple(d for d in DECODERS if d.startswith("perturbation"))
MAGNITUDE_DECODERS: tuple[str, ...] = tuple(d for d in DECODERS if d not in PERTURBATION_DECODERS)
