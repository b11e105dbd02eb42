"""Statistics of robust accuracies: 95 % intervals, and paired comparisons on the same images.

An accuracy measured on ``n`` images is a binomial proportion: :func:`wilson_interval` gives its
95 % Wilson score interval (Wilson 1927; Brown, Cai and DasGupta 2001 recommend it over the
normal interval for small ``n`` and proportions near 0 or 1). Two models evaluated on the *same*
images are compared image by image (:func:`paired_test`): only the discordant images count
(robust for one model, not for the other), and under "no difference" each is equally likely to
go either way, so the exact McNemar test is a binomial test of ``b`` successes in ``b + c``
trials at 1/2 (McNemar 1947; scipy's ``binomtest``). :func:`pack_mask` / :func:`unpack_mask`
carry a per-image mask in a short string (an MLflow tag) so that a later comparison can pair
images without the records.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Interval",
    "PairedTest",
    "accuracy_interval",
    "pack_mask",
    "paired_test",
    "unpack_mask",
    "wilson_interval",
]

Z95 = 1.959963984540054
"""The 97.5 % quantile of the standard normal: two-sided 95 %."""


@dataclass(frozen=True)
class Interval:
    """An accuracy ``k / n`` with its 95 % Wilson interval ``[low, high]``."""

    k: int
    n: int
    low: float
    high: float

    @property
    def accuracy(self) -> float:
        return self.k / self.n if self.n else math.nan

    def __str__(self) -> str:
        return f"{self.accuracy:.4f} [{self.low:.4f}, {self.high:.4f}] (n={self.n})"


def wilson_interval(k: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (default: 95 %).

    Returns ``(nan, nan)`` for ``n == 0``. At 4 of 20: (0.081, 0.416).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 (k = n) the bound is exactly 0 (1); keep it so despite rounding
    return (0.0 if k == 0 else max(0.0, centre - half)), (
        1.0 if k == n else min(1.0, centre + half)
    )


def accuracy_interval(mask: Tensor) -> Interval:
    """:class:`Interval` of a per-image boolean mask (True: correct / robust)."""
    k, n = int(mask.sum()), int(mask.numel())
    return Interval(k, n, *wilson_interval(k, n))


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same ``n`` images: ``a_only`` images robust for A only, ``b_only`` for
    B only; ``p_a_better`` the exact one-sided McNemar p-value of "A is more robust"."""

    n: int
    a_only: int
    b_only: int
    p_a_better: float

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B (only discordant images differ)."""
        return (self.a_only - self.b_only) / self.n if self.n else math.nan

    def significant(self, alpha: float = 0.05) -> bool:
        """A is significantly more robust than B at level ``alpha`` (one-sided)."""
        return self.p_a_better < alpha

    def __str__(self) -> str:
        return (
            f"paired on {self.n} images: {self.a_only} robust only for the candidate, "
            f"{self.b_only} only for the other, exact McNemar p = {self.p_a_better:.3g}"
        )


def paired_test(a: Tensor, b: Tensor) -> PairedTest:
    """Exact one-sided McNemar test of "A is more robust than B" on the same images.

    Args:
        a: (n,) bool, True where model A is robust (correct after every attack).
        b: (n,) bool, the same images for model B.

    Returns:
        The discordant counts and ``P(X >= a_only)`` for ``X ~ Binomial(a_only + b_only, 1/2)``
        (1.0 when there is no discordant image).
    """
    a, b = torch.as_tensor(a, dtype=torch.bool).cpu(), torch.as_tensor(b, dtype=torch.bool).cpu()
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired test needs two masks over the same images: {a.shape} vs {b.shape}"
        )
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    if a_only + b_only == 0:
        return PairedTest(a.numel(), 0, 0, 1.0)
    from scipy.stats import binomtest  # scipy is a dependency; imported where used

    p = binomtest(a_only, a_only + b_only, 0.5, alternative="greater").pvalue
    return PairedTest(a.numel(), a_only, b_only, float(p))


def pack_mask(mask: Tensor) -> str:
    """A per-image bool mask as a short ASCII string: ``"<n>:" + base64(zlib(packbits))``.

    10,000 images take at most about 1,700 characters (an MLflow tag holds 5,000 or more).
    """
    m = torch.as_tensor(mask, dtype=torch.bool).cpu().numpy()
    data = zlib.compress(np.packbits(m).tobytes(), 9)
    return f"{m.size}:{base64.b64encode(data).decode('ascii')}"


def unpack_mask(text: str) -> Tensor:
    """The mask of :func:`pack_mask`."""
    n, _, body = text.partition(":")
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(body)), dtype=np.uint8))
    return torch.from_numpy(bits[: int(n)].astype(bool))
