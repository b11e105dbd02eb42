"""PC-DARTS supernet with log-normal architecture parameters (RACL, spec §2.2 and §2.4).

Eq. (5): node ``j`` is ``sum_{i<j} beta_ij * sum_o alpha_ij,o * o(I_i)``, with PC-DARTS partial
channels (Xu et al. 2020, arXiv:1907.05737): only ``1/K`` of the channels of ``I_i`` pass the
mixed op, the rest bypass it, then a channel shuffle. RACL (Dong et al., TPAMI 2025) makes the
architecture parameters random: every op logit and edge logit ``z`` is ``N(mu, sigma^2)``, i.e.
``alpha = exp(z)`` is log-normal; a forward pass uses ``softmax(z)`` of a reparameterised sample
(``z = mu + sigma * eps``), or of ``mu`` (the median) in deterministic mode.

The per-edge loop here (``fused=False``) is the readable reference; :mod:`rarn.nas._fused` computes
the same function with the ops that share an input batched together (``fused=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.config import SearchConfig
from rarn.space.genotype import edge_endpoints
from rarn.space.ops import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN, build_op, channel_shuffle

__all__ = ["ArchDistribution", "ArchSample", "MixedOp", "SearchCell", "Supernet", "node_softmax"]


def _per_node(fn: Callable[..., Tensor], z: Tensor, nodes: int) -> Tensor:
    """``fn(..., dim=-1)`` over the incoming edges of each node (node ``j`` has ``j + 2``)."""
    parts, start = [], 0
    for j in range(nodes):
        parts.append(fn(z[..., start : start + j + 2], dim=-1))
        start += j + 2
    return torch.cat(parts, dim=-1)


def node_softmax(z: Tensor, nodes: int) -> Tensor:
    """Softmax of edge logits ``z[..., E]`` over the incoming edges of each node (PC-DARTS)."""
    return _per_node(torch.softmax, z, nodes)


def node_log_softmax(z: Tensor, nodes: int) -> Tensor:
    """``log`` of :func:`node_softmax`, computed stably."""
    return _per_node(torch.log_softmax, z, nodes)


@dataclass(frozen=True)
class ArchSample:
    """One draw of the architecture logits: op logits ``[E, n_ops]`` and edge logits ``[E]``."""

    normal: Tensor
    reduce: Tensor
    normal_edges: Tensor
    reduce_edges: Tensor

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.normal, self.reduce, self.normal_edges, self.reduce_edges)


class ArchDistribution(nn.Module):
    """Diagonal log-normal architecture parameters: ``(mu, log_sigma)`` per op and edge logit.

    ``2 x (14 x 8 x 2 + 14 x 2) = 504`` scalars for the DARTS space with 4 nodes (spec §2.2).
    """

    NAMES = ("normal", "reduce", "normal_edges", "reduce_edges")

    def __init__(
        self,
        nodes: int = 4,
        n_ops: int = len(PRIMITIVES),
        sigma_init: float = 0.3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        E = len(edge_endpoints(nodes))
        self.nodes = nodes
        shapes = {
            "normal": (E, n_ops),
            "reduce": (E, n_ops),
            "normal_edges": (E,),
            "reduce_edges": (E,),
        }
        for name, shape in shapes.items():
            # DARTS initialises alphas at 1e-3 * N(0, 1).
            self.register_parameter(
                f"mu_{name}", nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
            )
            self.register_parameter(
                f"log_sigma_{name}",
                nn.Parameter(torch.full(shape, float(torch.tensor(sigma_init).log()))),
            )

    def mu(self) -> ArchSample:
        return ArchSample(*(getattr(self, f"mu_{n}") for n in self.NAMES))

    def sigma(self) -> ArchSample:
        return ArchSample(*(getattr(self, f"log_sigma_{n}").exp() for n in self.NAMES))

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> ArchSample:
        """Reparameterised logits ``mu + sigma * eps`` (a leading dim ``n`` when given)."""
        out = []
        for name in self.NAMES:
            mu, log_sigma = getattr(self, f"mu_{name}"), getattr(self, f"log_sigma_{name}")
            shape = mu.shape if n is None else (n, *mu.shape)
            gen_device = generator.device if generator is not None else torch.device("cpu")
            eps = torch.randn(shape, generator=generator, device=gen_device).to(mu.device, mu.dtype)
            out.append(mu + log_sigma.exp() * eps)
        return ArchSample(*out)

    @torch.no_grad()
    def clamp_sigma(self, sigma_min: float, sigma_max: float) -> None:
        lo, hi = float(torch.tensor(sigma_min).log()), float(torch.tensor(sigma_max).log())
        for name in self.NAMES:
            getattr(self, f"log_sigma_{name}").clamp_(lo, hi)


class MixedOp(nn.Module):
    """PC-DARTS partial-channel mixed op: ``sum_o w_o o(x[:, :C/K])`` + bypass, shuffled."""

    def __init__(self, C: int, stride: int, k: int) -> None:
        super().__init__()
        self.k, self.stride = k, stride
        ops = []
        for name in PRIMITIVES:
            op = build_op(name, C // k, stride, affine=False)
            # PC-DARTS normalises pool outputs (so pools are not 1-Lipschitz)
            if OPS[name].kind == "pool":
                op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)
        self._zero = {i for i, name in enumerate(PRIMITIVES) if OPS[name].kind == "none"}

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        c = x.shape[1] // self.k
        xa, xb = x[:, :c], x[:, c:]
        # `none` contributes w * 0 exactly; skipping it changes no value.
        out = sum(
            w * op(xa) for i, (w, op) in enumerate(zip(weights, self.ops)) if i not in self._zero
        )
        if self.k == 1:  # no bypass channels (max_pool2d rejects an empty x_b)
            return out
        if self.stride == 2:
            xb = F.max_pool2d(xb, 2, 2, ceil_mode=True)
        return channel_shuffle(torch.cat([out, xb], dim=1), self.k)


class SearchCell(nn.Module):
    """A DARTS cell of mixed ops: 2 inputs, ``nodes`` intermediate nodes, concat of the nodes."""

    def __init__(
        self,
        nodes: int,
        multiplier: int,
        C_pp: int,
        C_p: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        k: int,
    ) -> None:
        super().__init__()
        self.nodes, self.multiplier, self.reduction = nodes, multiplier, reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_pp, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_pp, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and i < 2 else 1, k) for i, _ in edge_endpoints(nodes)
        )

    def forward(self, s0: Tensor, s1: Tensor, op_weights: Tensor, edge_weights: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for _ in range(self.nodes):
            s = sum(
                edge_weights[e + i] * self.edges[e + i](h, op_weights[e + i])
                for i, h in enumerate(states)
            )
            e += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


class Supernet(nn.Module):
    """The PC-DARTS search network: stem, ``layers`` cells (reductions at 1/3, 2/3), classifier.

    ``weight_parameters()`` and ``arch_parameters()`` partition ``parameters()``.
    """

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        in_channels: int = 3,
        nodes: int = 4,
        multiplier: int | None = None,
        stem_multiplier: int = 3,
        k: int = 4,
        sigma_init: float = 0.3,
        fused: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if C % k or (C // k) % 2:
            raise ValueError(
                f"init_channels={C} must be a multiple of 2*K (K={k} partial channels)"
            )
        if layers < 3:
            raise ValueError(f"layers={layers}: need at least 3 cells (two are reductions)")
        self.nodes, self.k, self.fused = nodes, k, fused
        multiplier = nodes if multiplier is None else multiplier  # concat all intermediate nodes
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr)
        )
        C_pp, C_p, C_curr = C_curr, C_curr, C
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cells.append(
                SearchCell(nodes, multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, k)
            )
            reduction_prev = reduction
            C_pp, C_p = C_p, multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        self.classifier = nn.Linear(C_p, num_classes)
        self.arch = ArchDistribution(nodes, len(PRIMITIVES), sigma_init, generator)

    @classmethod
    def from_config(cls, search: SearchConfig, *, num_classes: int, in_channels: int) -> Supernet:
        """The supernet of a ``search`` section, initialised from ``search.seed`` alone."""
        with torch.random.fork_rng(devices=[]):  # module init uses the global RNG; do not leak
            torch.manual_seed(search.seed)
            return cls(
                search.init_channels,
                num_classes,
                search.layers,
                in_channels,
                nodes=search.nodes,
                k=search.partial_channels,
                sigma_init=search.sigma_init,
                fused=search.fused,
                generator=torch.Generator().manual_seed(search.seed),
            )

    def bounded_modules(self) -> list[nn.Module]:
        """What the Lipschitz estimator bounds, in the order the bound reads it: every mixed op's
        op (cell, edge, op order), then the fixed layers (stem, classifier, each cell's two
        preprocessings)."""
        cells = list(self.cells)
        ops = [op for cell in cells for edge in cell.edges for op in edge.ops]
        fixed = [self.stem, self.classifier]
        return ops + fixed + [m for cell in cells for m in (cell.preprocess0, cell.preprocess1)]

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch.parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.arch.parameters())

    def mixing_weights(self, z: ArchSample) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Op weights ``softmax_o(z)`` and PC-DARTS edge weights for both cell types."""
        return (
            torch.softmax(z.normal, dim=-1),
            torch.softmax(z.reduce, dim=-1),
            node_softmax(z.normal_edges, self.nodes),
            node_softmax(z.reduce_edges, self.nodes),
        )

    def forward(
        self,
        x: Tensor,
        z: ArchSample | None = None,
        *,
        weights: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Logits for ``x`` under architecture logits ``z`` (default: the median, ``mu``), or
        under given mixing ``weights`` (``(op_normal, op_reduce, edge_normal, edge_reduce)``, as
        :meth:`mixing_weights` returns them; used as they are, e.g. with one op or edge zeroed
        and not renormalised, :mod:`rarn.nas.perturbation`); weights with a leading ``[G]``
        give ``[G, B, classes]`` (:meth:`grouped_forward`)."""
        if weights is None:
            weights = self.mixing_weights(self.arch.mu() if z is None else z)
        if weights[0].dim() == 3:
            return self.grouped_forward(x, weights)
        w_n, w_r, b_n, b_r = weights
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            ow, ew = (w_r, b_r) if cell.reduction else (w_n, b_n)
            if self.fused:
                from rarn.nas._fused import fused_cell_forward

                s0, s1 = s1, fused_cell_forward(cell, s0, s1, ow, ew)
            else:
                s0, s1 = s1, cell(s0, s1, ow, ew)
        out = F.adaptive_avg_pool2d(s1, 1).flatten(1)
        return self.classifier(out)

    def grouped_forward(self, x: Tensor, weights: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        """Logits ``[G, B, classes]`` of ``x`` under ``G`` sets of mixing weights (each of
        ``weights`` with a leading ``[G]``), as ``G`` separate forwards would give them, up to
        float rounding: one pass over ``G`` copies of the batch, every mixed op and edge weighed
        per copy and, in training mode, every batch norm normalising each copy with its own
        statistics. The running statistics are not what ``G`` passes would leave (the stem's
        are updated once, the cells' not at all): use it inside
        :func:`rarn.nas.supernet_loss.frozen_statistics`. The perturbation selection's
        ablations run this way (:mod:`rarn.nas.perturbation`): one pass instead of ``G`` small
        ones. Needs the fused forward (``fused=True``)."""
        if not self.fused:
            raise NotImplementedError("grouped mixing weights need the fused forward (fused=True)")
        from rarn.nas._fused import fused_cell_forward
        from rarn.nas._fused_kernels import grouped_statistics

        G, B = weights[0].shape[0], x.shape[0]
        w_n, w_r, b_n, b_r = weights
        s0 = s1 = self.stem(x).repeat(G, 1, 1, 1)  # the stem does not depend on the weights
        with grouped_statistics(G):
            for cell in self.cells:
                ow, ew = (w_r, b_r) if cell.reduction else (w_n, b_n)
                s0, s1 = s1, fused_cell_forward(cell, s0, s1, ow, ew)
        out = F.adaptive_avg_pool2d(s1, 1).flatten(1)
        return self.classifier(out).view(G, B, -1)
