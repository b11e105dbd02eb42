"""Discrete architectures: the frozen ``Genotype`` value type, decoding, and bundled genotypes.

A genotype lists, for the normal and the reduction cell, two ``(op, input)`` pairs per
intermediate node (DARTS encoding: inputs 0 and 1 are the cell inputs c_{k-2}, c_{k-1}, input
``i >= 2`` is node ``i``). :func:`derive_genotype` is the pure decoding rule of spec §2.8: best
non-``none`` op per edge, top-2 incoming edges per node by ``op score x edge weight``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from rarn.search_space import PARAMETRIC, PRIMITIVES

__all__ = [
    "GENOTYPES",
    "Genotype",
    "derive_genotype",
    "edge_endpoints",
    "get_genotype",
    "parametric_share",
]


@dataclass(frozen=True)
class Genotype:
    """A cell pair: ``normal``/``reduce`` hold 2 ``(op, input)`` pairs per node, in node order."""

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("normal", "reduce"):
            pairs = tuple((str(op), int(i)) for op, i in getattr(self, name))
            object.__setattr__(self, name, pairs)
            if not pairs or len(pairs) % 2:
                raise ValueError(f"Genotype.{name}: need 2 (op, input) pairs per node, got {pairs}")
            for k, (op, i) in enumerate(pairs):
                node = k // 2 + 2
                if op not in PRIMITIVES or op == "none":
                    known = ", ".join(p for p in PRIMITIVES if p != "none")
                    raise ValueError(f"Genotype.{name}[{k}]: unknown op {op!r}; known: {known}")
                if not 0 <= i < node:
                    raise ValueError(
                        f"Genotype.{name}[{k}]: node {node} cannot take input {i} "
                        f"(valid 0..{node - 1})"
                    )
        for name in ("normal_concat", "reduce_concat"):
            concat = tuple(int(i) for i in getattr(self, name))
            object.__setattr__(self, name, concat)
            n = len(getattr(self, name.split("_")[0])) // 2 + 2
            if not concat or any(not 0 <= i < n for i in concat):
                raise ValueError(f"Genotype.{name}: indices must lie in 0..{n - 1}, got {concat}")

    @property
    def nodes(self) -> int:
        return len(self.normal) // 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": [list(p) for p in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(p) for p in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Genotype:
        missing = {"normal", "normal_concat", "reduce", "reduce_concat"} - set(d)
        if missing:
            raise ValueError(f"genotype dict lacks {sorted(missing)}")
        return cls(d["normal"], d["normal_concat"], d["reduce"], d["reduce_concat"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        return cls.from_dict(json.loads(text))

    def sha256(self) -> str:
        """Content hash of the canonical JSON (stable across processes; used for lineage)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def parametric_share(genotype: Genotype) -> float:
    """Share of the genotype's edges (both cells) that are convolutions."""
    ops = [op for op, _ in genotype.normal + genotype.reduce]
    return sum(op in PARAMETRIC for op in ops) / len(ops)


def edge_endpoints(nodes: int) -> list[tuple[int, int]]:
    """``(input, node)`` for every supernet edge, in DARTS order (node 2's edges first)."""
    return [(i, j + 2) for j in range(nodes) for i in range(j + 2)]


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


def _g(normal: Sequence[tuple[str, int]], reduce: Sequence[tuple[str, int]]) -> Genotype:
    return Genotype(tuple(normal), (2, 3, 4, 5), tuple(reduce), (2, 3, 4, 5))


# Published genotypes (spec §7 for RACL; DARTS and PC-DARTS from their papers' code).
GENOTYPES: dict[str, Genotype] = {
    "RACL": _g(
        [
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_5x5", 0),
            ("skip_connect", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 3),
            ("sep_conv_3x3", 3),
            ("skip_connect", 4),
        ],
        [
            ("sep_conv_3x3", 0),
            ("sep_conv_5x5", 1),
            ("avg_pool_3x3", 0),
            ("dil_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("sep_conv_5x5", 1),
            ("sep_conv_3x3", 2),
            ("dil_conv_3x3", 3),
        ],
    ),  # fmt: skip
    "DARTS_V1": _g(
        [
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 2),
        ],
        [
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("avg_pool_3x3", 0),
        ],
    ),  # fmt: skip
    "DARTS_V2": _g(
        [
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("skip_connect", 0),
            ("dil_conv_3x3", 2),
        ],
        [
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
        ],
    ),  # fmt: skip
    "PC_DARTS": _g(
        [
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 0),
            ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0),
            ("sep_conv_3x3", 1),
            ("avg_pool_3x3", 0),
            ("dil_conv_3x3", 1),
        ],
        [
            ("sep_conv_5x5", 1),
            ("max_pool_3x3", 0),
            ("sep_conv_5x5", 1),
            ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 2),
        ],
    ),  # fmt: skip
}


def get_genotype(name_or_path: str) -> Genotype:
    """A bundled genotype by name, or one read from a JSON file path."""
    if name_or_path in GENOTYPES:
        return GENOTYPES[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"genotype file not found: {p}")
        try:
            return Genotype.from_json(p.read_text())
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{p}: not a valid genotype JSON: {e}") from None
    raise KeyError(
        f"unknown genotype {name_or_path!r}; known: {', '.join(GENOTYPES)} (or a path to a .json)"
    )
