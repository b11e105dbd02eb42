"""Collapse detection: a decoded genotype that the search did not really choose.

Differentiable NAS is known to collapse: DARTS fills its normal cell with parameter-free ops
(skip connections, pools) as the supernet trains (Zela et al. 2020, arXiv:1909.09656; Liang et al.
2019, DARTS+, arXiv:1909.06035; Chen et al. 2019, P-DARTS, arXiv:1904.12760), and RACL's
constraint adds a collapse of its own: when the Lipschitz penalty outweighs the validation CE, every
edge takes the op with the lowest Lipschitz constant, so the genotype is the constraint's ranking
of the ops, not the data's (issue 12 measured 16/16 ``dil_conv_3x3`` on digits). Three signals,
each with a limit (``SearchConfig.collapse_*_limit``), a share at or above it counting:

* ``param_free``: the normal cell's share of parameter-free edges (skip, pools). Published normal
  cells hold at most 3/8 (RACL, DARTS V1); reduction cells are not judged (DARTS V2's is all pools
  and skips) but their share is reported.
* ``dominant_op``: one op's share of a cell's edges, for either cell (published cells: <= 5/8).
* ``lambda_ranking``: the share of the genotype's edges whose op has the lowest Lipschitz
  constant of its edge, among all non-``none`` ops or among the convolutions (the larger of the
  two; a constraint over only the convolutions ranks only them). ``ln lambda`` of an op is its mean
  over the cells of its type, read without advancing the power iteration.

:func:`detect_collapse` reports every signal, whether any tripped and why; ``run_search`` logs it
every epoch (``collapse_*`` metrics) and returns it for the final genotype.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rarn.config import SearchConfig
from rarn.space.genotype import Genotype, edge_endpoints
from rarn.space.ops import PARAMETRIC, PRIMITIVES

__all__ = [
    "PARAMETER_FREE",
    "CollapseLimits",
    "CollapseReport",
    "cell_log_lipschitz",
    "detect_collapse",
    "lambda_ranking_share",
]

PARAMETER_FREE: frozenset[str] = frozenset(
    p for p in PRIMITIVES if p != "none" and p not in PARAMETRIC
)
_CELLS = ("normal", "reduce")
_CANDIDATES = {
    "all ops": tuple(p for p in PRIMITIVES if p != "none"),
    "convolutions": tuple(p for p in PRIMITIVES if p in PARAMETRIC),
}


@dataclass(frozen=True)
class CollapseLimits:
    """Shares at or above which a signal counts as collapse (see the module docstring); the
    defaults are :class:`~rarn.config.SearchConfig`'s."""

    param_free: float = SearchConfig.collapse_param_free_limit
    dominant_op: float = SearchConfig.collapse_dominant_limit
    lambda_ranking: float = SearchConfig.collapse_lambda_limit

    @classmethod
    def of(cls, cfg: SearchConfig) -> CollapseLimits:
        return cls(
            cfg.collapse_param_free_limit, cfg.collapse_dominant_limit, cfg.collapse_lambda_limit
        )


@dataclass(frozen=True)
class CollapseReport:
    """The three signals of one genotype and the reasons of those that tripped.

    Attributes:
        param_free_share: per cell type, the share of parameter-free edges.
        dominant_op: per cell type, the most frequent op and its share of the cell's edges.
        lambda_ranking: share of edges on the lowest-Lipschitz op (``None``: no constants given).
        reasons: one line per tripped signal, empty when the genotype did not collapse.
    """

    param_free_share: Mapping[str, float]
    dominant_op: Mapping[str, tuple[str, float]]
    lambda_ranking: float | None
    reasons: tuple[str, ...]

    @property
    def collapsed(self) -> bool:
        return bool(self.reasons)

    @property
    def reason(self) -> str:
        """The tripped signals, ``"; "``-joined (``""`` when not collapsed)."""
        return "; ".join(self.reasons)

    def metrics(self) -> dict[str, float]:
        """Flat float metrics (``collapse_*`` and ``collapsed``) for the search history."""
        out = {f"collapse_param_free_share_{c}": self.param_free_share[c] for c in _CELLS}
        out["collapse_dominant_op_share"] = max(share for _, share in self.dominant_op.values())
        if self.lambda_ranking is not None:
            out["collapse_lambda_ranking"] = self.lambda_ranking
        out["collapsed"] = float(self.collapsed)
        return out


def detect_collapse(
    genotype: Genotype,
    log_lam: Mapping[str, Tensor] | None = None,
    limits: CollapseLimits = CollapseLimits(),
) -> CollapseReport:
    """The collapse signals of ``genotype``.

    Args:
        genotype: the decoded genotype.
        log_lam: per cell type (``normal``, ``reduce``) the ``[E, n_ops]`` log-Lipschitz constants
            of the supernet's ops (:func:`cell_log_lipschitz`); ``None`` skips that signal.
        limits: the shares at or above which a signal trips.
    """
    reasons: list[str] = []
    shares, dominant = {}, {}
    for cell in _CELLS:
        ops = [op for op, _ in getattr(genotype, cell)]
        n_free = sum(op in PARAMETER_FREE for op in ops)
        shares[cell] = n_free / len(ops)
        op, count = Counter(ops).most_common(1)[0]
        dominant[cell] = (op, count / len(ops))
        if cell == "normal" and shares[cell] >= limits.param_free:
            reasons.append(
                f"normal cell {n_free}/{len(ops)} edges parameter-free (skip/pool) >= "
                f"{limits.param_free:.0%}: the DARTS parameter-free collapse"
            )
        if count / len(ops) >= limits.dominant_op:
            reasons.append(
                f"{cell} cell {op} on {count}/{len(ops)} edges >= {limits.dominant_op:.0%}: one "
                "op decides the cell"
            )
    ranking = None
    if log_lam is not None:
        ranking, among = max(
            (lambda_ranking_share(genotype, log_lam, ops), name)
            for name, ops in _CANDIDATES.items()
        )
        if ranking >= limits.lambda_ranking:
            reasons.append(
                f"{ranking:.0%} of edges take the lowest-Lipschitz op of their edge (among "
                f"{among}) >= {limits.lambda_ranking:.0%}: the constraint's ranking decided, "
                "not the data"
            )
    return CollapseReport(shares, dominant, ranking, tuple(reasons))


def lambda_ranking_share(
    genotype: Genotype, log_lam: Mapping[str, Tensor], candidates: tuple[str, ...]
) -> float:
    """Share of the genotype's edges (both cells) whose op is the lowest-``log_lam`` op of that
    supernet edge among ``candidates``; an edge with an op outside ``candidates`` does not count."""
    cols = [PRIMITIVES.index(p) for p in candidates]
    index = {end: e for e, end in enumerate(edge_endpoints(genotype.nodes))}
    hits = total = 0
    for cell in _CELLS:
        table = log_lam[cell].detach().double()[:, cols]  # [E, len(candidates)]
        for k, (op, i) in enumerate(getattr(genotype, cell)):
            e = index[(i, k // 2 + 2)]
            hits += op == candidates[int(table[e].argmin())]
            total += 1
    return hits / total


def cell_log_lipschitz(model: nn.Module) -> dict[str, Tensor]:
    """Per cell type, the mean over its cells of the per-op log-Lipschitz constants ``[E, n_ops]``
    of a supernet with an attached estimator (``model.lipschitz``, ops first in (cell, edge, op)
    order, see ``rarn.nas.search``), without advancing the power iteration."""
    cells = list(model.cells)
    E, n_ops = len(cells[0].edges), len(cells[0].edges[0].ops)
    with torch.no_grad():
        lam = model.lipschitz(n_iters=1, update=False)[: len(cells) * E * n_ops]
    lam = lam.view(len(cells), E, n_ops)
    reduce = torch.tensor([c.reduction for c in cells], device=lam.device)
    return {"normal": lam[~reduce].mean(0), "reduce": lam[reduce].mean(0)}
