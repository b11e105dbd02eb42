"""Decoding: from op scores or architecture distributions to a discrete :class:`Genotype` (spec
§2.8).

* :func:`derive_genotype` is the DARTS/PC-DARTS rule on given scores: per node the two strongest
  incoming edges, each with its best non-``none`` op.
* :func:`decode` turns the supernet's log-normal architecture distributions into scores by one of
  :data:`DECODERS` (eta-lower quantile, median, or a majority vote over samples).
"""

from __future__ import annotations

from collections import Counter
from typing import get_args

import torch
from torch import Tensor

from rarn.config import DecodeRule
from rarn.nas.genotype import Genotype
from rarn.nas.ops import PRIMITIVES
from rarn.nas.supernet import ArchSample, Supernet, node_softmax

__all__ = ["DECODERS", "decode", "derive_genotype"]


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
