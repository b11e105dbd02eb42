"""Discrete architectures: the frozen ``Genotype`` value type and the bundled (published) genotypes.

A genotype lists, for the normal and the reduction cell, two ``(op, input)`` pairs per
intermediate node (DARTS encoding: inputs 0 and 1 are the cell inputs c_{k-2}, c_{k-1}, input
``i >= 2`` is node ``i``). :func:`rarn.nas.decode.derive_genotype` is the pure decoding rule of
spec §2.8: best
non-``none`` op per edge, top-2 incoming edges per node by ``op score x edge weight``.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rarn.space.ops import PARAMETRIC, PRIMITIVES

__all__ = [
    "GENOTYPES",
    "Genotype",
    "edge_endpoints",
    "get_genotype",
    "parametric_share",
    "random_genotype",
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
            pairs = tuple(
                _pair(p, f"Genotype.{name}[{k}]") for k, p in enumerate(_items(self, name))
            )
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
            concat = tuple(
                _index(v, f"Genotype.{name}[{k}]") for k, v in enumerate(_items(self, name))
            )
            object.__setattr__(self, name, concat)
            n = len(getattr(self, name.split("_")[0])) // 2 + 2
            if not concat or any(not 0 <= i < n for i in concat):
                raise ValueError(f"Genotype.{name}: indices must lie in 0..{n - 1}, got {concat}")
            if len(set(concat)) < len(concat):
                raise ValueError(f"Genotype.{name}: each node at most once, got {concat}")

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
        """The inverse of :meth:`to_dict`; ValueError naming the field for anything malformed."""
        if not isinstance(d, Mapping):
            raise ValueError(
                "genotype: expected a mapping with normal, normal_concat, reduce and "
                f"reduce_concat, got {d!r:.80}"
            )
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


def _items(genotype: Genotype, name: str) -> tuple[Any, ...]:
    """A field as a tuple; a string, a mapping or a scalar is not a list of entries."""
    value = getattr(genotype, name)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        what = "(op, input) pairs" if name in ("normal", "reduce") else "node indices"
        raise ValueError(f"Genotype.{name}: expected a list of {what}, got {value!r:.80}")
    return tuple(value)


def _index(value: Any, where: str) -> int:
    """An integer index: ``1.7`` or ``"1"`` is an error, never silently truncated or parsed."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{where}: expected an integer index, got {value!r:.80}") from None


def _pair(value: Any, where: str) -> tuple[str, int]:
    """An ``(op, input)`` pair: a 2-item list or tuple of an op name and an integer index."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{where}: expected an (op, input) pair, got {value!r:.80}")
    items = tuple(value)
    if len(items) != 2 or not isinstance(items[0], str):
        raise ValueError(f"{where}: expected an (op name, input index) pair, got {value!r:.80}")
    return items[0], _index(items[1], f"{where} input")


def parametric_share(genotype: Genotype) -> float:
    """Share of the genotype's edges (both cells) that are convolutions."""
    ops = [op for op, _ in genotype.normal + genotype.reduce]
    return sum(op in PARAMETRIC for op in ops) / len(ops)


def edge_endpoints(nodes: int) -> list[tuple[int, int]]:
    """``(input, node)`` for every supernet edge, in DARTS order (node 2's edges first)."""
    return [(i, j + 2) for j in range(nodes) for i in range(j + 2)]


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
    if not isinstance(name_or_path, (str, Path)):
        raise ValueError(
            f"genotype: expected a bundled name ({', '.join(GENOTYPES)}) or a path to a .json "
            f"file, got {name_or_path!r:.80}"
        )
    if name_or_path in GENOTYPES:
        return GENOTYPES[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"genotype file not found: {p}")
        try:
            return Genotype.from_json(p.read_text())
        except (TypeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{p}: not a valid genotype JSON: {e}") from None
    raise KeyError(
        f"unknown genotype {name_or_path!r}; known: {', '.join(GENOTYPES)} (or a path to a .json)"
    )


def random_genotype(seed: int, nodes: int = 4) -> Genotype:
    """A genotype drawn uniformly: per node two distinct earlier inputs, an op each (no ``none``).

    The random baseline (``random-<seed>``) the DARTS literature compares against (Li and
    Talwalkar 2019, arXiv:1902.07638; Yu et al. 2020, arXiv:1902.08142): drawn from the same
    space as the decoder's output. A search that does not beat it at equal retraining budget has
    found nothing. Deterministic in ``seed`` (its own ``torch.Generator``), on every platform.
    """
    gen = torch.Generator().manual_seed(int(seed))
    ops = [p for p in PRIMITIVES if p != "none"]

    def cell() -> tuple[tuple[str, int], ...]:
        edges = []
        for i in range(nodes):
            inputs = torch.randperm(i + 2, generator=gen)[:2].sort().values.tolist()
            for j in inputs:
                edges.append((ops[int(torch.randint(len(ops), (1,), generator=gen))], int(j)))
        return tuple(edges)

    concat = tuple(range(2, nodes + 2))
    return Genotype(cell(), concat, cell(), concat)
