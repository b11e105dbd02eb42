"""Named search variants for study mode: a name -> dotted config overrides.

A variant is a set of dotted ``search.``/``constraint.`` overrides on the config it runs in, so a
study compares variants that differ in exactly what their overrides say (the data, the supernet's
size and the budget are the config's). ``racl`` is the config itself. ``random-<seed>`` names the
random-genotype baseline (:func:`rarn.space.genotype.random_genotype`).

Plain data: the config checks ``study.variants`` against this table without importing the library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["RANDOM_PREFIX", "VARIANTS", "random_seed_of", "variant_overrides"]

VARIANTS: dict[str, dict[str, Any]] = {
    # the config as it is (the shipped default: faithful bound, CE-balanced constraint)
    "racl": {},
    # the earlier default: bound over the convolutions only, per-node mean, no CE balance
    "racl_parametric": {
        "constraint.mixture": "parametric",
        "constraint.bound": "node_mean",
        "constraint.kappa": 0.05,
        "constraint.balance": "none",
    },
    # log-normal search with the gradient-norm term, without the chance constraint
    "constraint_off": {"constraint.enabled": False},
    # plain PC-DARTS: deterministic architecture, no constraint, no gradient-norm term
    "pcdarts_plain": {
        "constraint.enabled": False,
        "search.sampling": False,
        "search.grad_norm_weight": 0.0,
    },
    # RACL with the DARTS+ remedy: freeze the architecture once 3 of the normal cell's 8 edges
    # are parameter-free, rolled back to the last epoch below (Liang et al. 2019,
    # arXiv:1909.06035, stop at 2 skips)
    "racl_darts_plus": {"search.arch_stop_param_free": 0.375},
    # the limiting case of the warm-up: no architecture step at all, the genotype chosen by
    # perturbation of the trained supernet (Wang et al. 2021, arXiv:2108.04392)
    "no_arch_steps": {"search.warmup_min_steps": 10**9, "search.decode": "perturbation"},
    # RACL deciding by the ops' robust importance (PGD on D_V at search.robust_eval_eps)
    "racl_robust_pt": {"search.decode": "perturbation_robust"},
    # RACL deciding by the eta-quantile of the distributions (the magnitude rule of spec §2.8)
    "racl_quantile": {"search.decode": "quantile"},
}
"""Variant name -> overrides (``search.``/``constraint.`` keys only)."""

RANDOM_PREFIX = "random-"
_RANDOM = re.compile(r"random-(\d{1,10})")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def variant_overrides(name: str, define: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """The overrides of a variant: one of ``define`` (the config's own) or of :data:`VARIANTS`.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
        ValueError: a name that cannot be a folder and run name (lower-case, digits, ``_``).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"variant name {name!r}: use lower-case letters, digits and _ (at most 40), "
            "starting with a letter"
        )
    own = dict(define or {})
    if name in own:
        return dict(own[name])
    if name in VARIANTS:
        return dict(VARIANTS[name])
    known = sorted({*VARIANTS, *own})
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(known)} (or define it)")


def random_seed_of(name: str) -> int | None:
    """``random-<seed>`` -> seed; anything else -> None."""
    m = _RANDOM.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None
