"""The search-time Lipschitz estimator: log-bounds of all supernet ops in one batched pass.

The per-layer rules are those of :mod:`rarn.lipschitz.rules` (their ``terms`` face); this module
only evaluates them fast. :class:`LipschitzEstimator` decomposes each op into terms once, stacks
same-shaped weights and runs batched power iteration, so one update costs a few dozen kernels
however many ops there are.

Power iteration converges to ``sigma_max`` from below, so an estimate is only as good as its
iterations; the vectors persist across calls (one step per architecture step is enough once
warm, as in spectral normalisation, Miyato et al. 2018) and live in buffers, so they are saved in
checkpoints. A certified bound of a discrete network is :mod:`rarn.lipschitz.certify`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rarn.lipschitz.rules import bn_log_scale, depthwise_log_bound, terms_of

__all__ = ["LipschitzEstimator", "log_lipschitz", "power_iteration"]


def power_iteration(w: Tensor, u: Tensor, n_iters: int = 1) -> tuple[Tensor, Tensor]:
    """Largest singular value of ``w`` (``[..., m, n]``) and the updated left vectors ``u``.

    Batched over leading dims. Under-estimates ``sigma_max`` for few iterations (the estimate is
    ``u^T W v`` for unit ``u``, ``v``); callers that need a certified bound must iterate enough.

    Args:
        w: matrices ``[..., m, n]``.
        u: left vectors ``[..., m]`` (any non-zero start).
        n_iters: power-iteration steps.

    Returns:
        ``(sigma [...], u [..., m])``; neither carries gradient.
    """
    with torch.no_grad():
        for _ in range(max(1, n_iters)):
            v = F.normalize(torch.einsum("...mn,...m->...n", w, u), dim=-1, eps=1e-12)
            u = F.normalize(torch.einsum("...mn,...n->...m", w, v), dim=-1, eps=1e-12)
        sigma = torch.einsum("...m,...mn,...n->...", u, w, v)
    return sigma, u


def _matrix(m: nn.Module) -> Tensor:
    return m.weight.detach().reshape(m.weight.shape[0], -1)


class LipschitzEstimator(nn.Module):
    """Log-Lipschitz upper bounds of a fixed list of op modules, computed in one batched pass.

    The estimator keeps references to the ops (not as submodules, so parameters are not
    registered twice) and owns the power-iteration vectors as buffers ``u{group}``.

    Args:
        ops: the modules to bound (``nn.Sequential`` chains of convs, BNs, pools, ...).
        include_bn: multiply in BN scales from running statistics (spec §2.3).
        generator: seeds the initial power-iteration vectors.
    """

    def __init__(
        self,
        ops: Sequence[nn.Module],
        include_bn: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self._ops = list(ops)
        self.include_bn = include_bn
        terms = [terms_of(op) for op in self._ops]
        self._zero = torch.tensor([any(t.kind == "zero" for t in ts) for ts in terms])
        # Distinct matrices (grouped by shape), depthwise kernels and BNs, each computed once.
        self._mats: dict[tuple[int, ...], list[nn.Module]] = {}
        self._dws: dict[tuple[int, ...], list[nn.Module]] = {}
        self._bns: dict[tuple[int, ...], list[nn.Module]] = {}
        slot: dict[int, tuple[str, tuple[int, ...], int]] = {}

        def register(table: dict, kind: str, m: nn.Module, key: tuple[int, ...]) -> None:
            if id(m) not in slot:
                table.setdefault(key, []).append(m)
                slot[id(m)] = (kind, key, len(table[key]) - 1)

        for ts in terms:
            for t in ts:
                for m in t.modules:
                    if t.kind in ("matrix", "max_matrix"):
                        register(self._mats, "matrix", m, tuple(_matrix(m).shape))
                    elif t.kind == "depthwise":
                        register(self._dws, "depthwise", m, tuple(m.weight.shape))
                    elif t.kind == "bn":
                        register(self._bns, "bn", m, (m.num_features, int(m.affine)))
        # Flat value vector layout: [matrices..., depthwise..., bns...]
        offsets, n = {}, 0
        for kind, table in (("matrix", self._mats), ("depthwise", self._dws), ("bn", self._bns)):
            for key, mods in table.items():
                offsets[(kind, key)] = n
                n += len(mods)
        self._n_values = n
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        for g, (key, mods) in enumerate(self._mats.items()):
            u = F.normalize(torch.randn(len(mods), key[0], generator=gen), dim=-1)
            self.register_buffer(f"u{g}", u)
        # Per op: indices of added values, pairs for max terms, constants.
        add_op, add_idx, max_op, max_a, max_b, const = [], [], [], [], [], []
        for i, ts in enumerate(terms):
            c = 0.0
            for t in ts:
                if t.kind == "const":
                    c += t.value
                elif t.kind == "bn" and not include_bn:
                    continue
                elif t.kind == "max_matrix":
                    a, b = (offsets[("matrix", slot[id(m)][1])] + slot[id(m)][2] for m in t.modules)
                    max_op.append(i), max_a.append(a), max_b.append(b)
                elif t.kind != "zero":
                    kind, key, j = slot[id(t.modules[0])]
                    add_op.append(i), add_idx.append(offsets[(kind, key)] + j)
                    c += t.value
            const.append(c)
        self._add_op, self._add_idx = (
            torch.tensor(add_op, dtype=torch.long),
            torch.tensor(add_idx, dtype=torch.long),
        )
        self._max_op = torch.tensor(max_op, dtype=torch.long)
        self._max_a, self._max_b = (
            torch.tensor(max_a, dtype=torch.long),
            torch.tensor(max_b, dtype=torch.long),
        )
        self._const = torch.tensor(const, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self._ops)

    @torch.no_grad()
    def forward(self, n_iters: int = 1, update: bool = True) -> Tensor:
        """log-Lipschitz bound of every op, ``[len(ops)]`` (``-inf`` for ``none``); no gradient.

        Args:
            n_iters: power-iteration steps for every matrix.
            update: store the new power-iteration vectors (False: leave the buffers unchanged).
        """
        values: list[Tensor] = []
        for g, mods in enumerate(self._mats.values()):
            w = torch.stack([_matrix(m) for m in mods])  # [G, m, n]
            u = getattr(self, f"u{g}")
            sigma, u_new = power_iteration(w, u.to(w.dtype), n_iters)
            if update:
                # NB: in-place copy keeps the buffer object (and any state_dict view) alive.
                u.copy_(u_new)
            values.append(sigma.clamp_min(1e-30).log())
        for mods in self._dws.values():
            values.append(depthwise_log_bound(torch.stack([m.weight.detach() for m in mods])))
        for (_, affine), mods in self._bns.items():
            var = torch.stack([m.running_var for m in mods])
            gamma = torch.stack([m.weight.detach() for m in mods]) if affine else None
            values.append(bn_log_scale(var, mods[0].eps, gamma))
        device = self._const.device if not values else values[0].device
        flat = torch.cat(values).double() if values else torch.zeros(0, dtype=torch.float64)
        out = self._const.to(device).clone()
        if len(self._add_op):
            out.index_add_(0, self._add_op.to(device), flat[self._add_idx.to(device)])
        if len(self._max_op):
            mx = torch.maximum(flat[self._max_a.to(device)], flat[self._max_b.to(device)])
            out.index_add_(0, self._max_op.to(device), mx)
        out[self._zero.to(device)] = float("-inf")
        return out.float()


def log_lipschitz(module: nn.Module, n_iters: int = 50, include_bn: bool = True) -> float:
    """log-Lipschitz upper bound of one module (a chain of supported layers), standalone.

    Uses fresh power-iteration vectors and ``n_iters`` steps, so it is accurate but not cheap;
    training code should hold a :class:`LipschitzEstimator` instead.
    """
    est = LipschitzEstimator([module], include_bn=include_bn)
    return float(est(n_iters=n_iters, update=False)[0])
