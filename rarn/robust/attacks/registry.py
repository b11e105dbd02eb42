"""The attack registry: one :class:`AttackSpec` record per attack, looked up by name.

A record holds everything the rest of the library needs to know about an attack: the function,
the threat model of its ``eps``, who implements it (and which version, for results tables),
whether it uses gradients, which optional packages it imports, and how many iterations it really
runs. :data:`ATTACKS`, :data:`ATTACK_NORM` and :data:`ATTACK_IMPL` are read-only views derived
from the records, so there is one source of truth. A new attack is one :func:`register_attack`
call (wrap its body in :func:`rarn.robust.attacks.interface.uniform_attack`).
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from rarn.robust.attacks.adaptive import bpda, pgd_eot
from rarn.robust.attacks.black_box import square
from rarn.robust.attacks.external import (
    autoattack,
    autoattack_l2,
    autoattack_torchattacks,
    pgd_torchattacks,
)
from rarn.robust.attacks.gradient import cw, fgsm, mim, pgd, pgd_l2
from rarn.robust.attacks.interface import AttackFn

__all__ = [
    "ATTACKS",
    "ATTACK_IMPL",
    "ATTACK_NORM",
    "AttackSpec",
    "attack_spec",
    "get_attack",
    "register_attack",
]

_V = TypeVar("_V")


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    Attributes:
        name: registry key, used by configs and in the ``attack`` column of results tables.
        fn: the attack, with the uniform signature (:class:`AttackFn`).
        norm: threat model of its ``eps``: "linf" or "l2".
        implementation: who implements it ("rarn", "torchattacks"), for results tables.
        version: version of that implementation.
        white_box: uses the model's gradients; False for an outputs-only (black-box) attack,
            which the gradient-masking checks compare against the white-box ones.
        black_box_part: also runs an outputs-only component (AutoAttack's Square), so its
            per-image results are not white-box evidence for the per-image black-box check.
        needs: optional distributions it imports when called (never at import time).
        steps_from: the iterations it really runs, as results tables report them. None: the
            ``steps`` argument; an int: fixed (FGSM: 1); ``(kwarg, default)``: an extra keyword
            argument that replaces ``steps`` (AutoAttack: ``("n_iter", 100)``).
    """

    name: str
    fn: AttackFn
    norm: Literal["linf", "l2"]
    implementation: str
    version: str
    white_box: bool = True
    black_box_part: bool = False
    needs: tuple[str, ...] = ()
    steps_from: int | tuple[str, int] | None = None

    def effective_steps(self, params: Mapping[str, Any]) -> int:
        """Iterations run with the keyword arguments ``params`` (``steps`` and extras)."""
        if self.steps_from is None:
            return int(params["steps"])
        if isinstance(self.steps_from, int):
            return self.steps_from
        kwarg, default = self.steps_from
        return int(params.get(kwarg, default))

    def settings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Every keyword argument the attack runs with: its defaults, overridden by ``params``.

        What results tables record, so that a run can be reproduced or recombined without
        reading the code (e.g. MIM's ``decay``, CW's ``kappa``, Square's ``p_init``).
        """
        own = inspect.signature(self.fn).parameters.values()
        out = {p.name: p.default for p in own if p.default is not inspect.Parameter.empty}
        out.pop("generator", None)
        return {**out, **params}


_REGISTRY: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add ``spec`` to the registry; returns it.

    Raises:
        ValueError: a spec of that name is already registered, or the norm is unknown.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"attack {spec.name!r} is already registered")
    if spec.norm not in ("linf", "l2"):
        raise ValueError(f"attack {spec.name!r}: norm must be 'linf' or 'l2', got {spec.norm!r}")
    _REGISTRY[spec.name] = spec
    return spec


def attack_spec(name: str) -> AttackSpec:
    """The record of the attack ``name``.

    Raises:
        KeyError: listing the known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; known: {sorted(_REGISTRY)}") from None


def get_attack(name: str) -> AttackFn:
    """Look up an attack by name.

    Args:
        name: a key of :data:`ATTACKS`.

    Returns:
        The attack function.

    Raises:
        KeyError: listing the known names.
    """
    return attack_spec(name).fn


class _View(Mapping[str, _V]):
    """A read-only, live view of one field of every registered spec (name -> field)."""

    def __init__(self, field: Callable[[AttackSpec], _V], doc: str) -> None:
        self._field = field
        self.__doc__ = doc

    def __getitem__(self, name: str) -> _V:
        return self._field(_REGISTRY[name])

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


ATTACKS: Mapping[str, AttackFn] = _View(
    lambda s: s.fn, "Attack name -> function with the uniform signature."
)
ATTACK_NORM: Mapping[str, str] = _View(
    lambda s: s.norm, 'Attack name -> threat model of its ``eps`` ("linf" or "l2").'
)
ATTACK_IMPL: Mapping[str, tuple[str, str]] = _View(
    lambda s: (s.implementation, s.version),
    "Attack name -> (implementation, version) for results tables.",
)


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


_RARN: dict[str, Any] = {"implementation": "rarn", "version": _dist_version("rarn")}
_REFERENCE: dict[str, Any] = {
    "implementation": "pyautoattack",
    "version": _dist_version("pyautoattack"),
    "needs": ("pyautoattack",),
    "black_box_part": True,
    "steps_from": ("n_iter", 100),
}
_TORCHATTACKS: dict[str, Any] = {
    "implementation": "torchattacks",
    "version": _dist_version("torchattacks"),
    "needs": ("torchattacks",),
}
for _spec in (
    AttackSpec("fgsm", fgsm, "linf", **_RARN, steps_from=1),
    AttackSpec("pgd", pgd, "linf", **_RARN),
    AttackSpec("pgd_l2", pgd_l2, "l2", **_RARN),
    AttackSpec("mim", mim, "linf", **_RARN),
    AttackSpec("cw", cw, "linf", **_RARN),
    AttackSpec("square", square, "linf", **_RARN, white_box=False),
    AttackSpec("bpda", bpda, "linf", **_RARN),  # adaptive: straight-through input transforms
    AttackSpec("pgd_eot", pgd_eot, "linf", **_RARN),  # adaptive: randomised models
    AttackSpec("autoattack", autoattack, "linf", **_REFERENCE),  # Croce and Hein's code
    AttackSpec("autoattack_l2", autoattack_l2, "l2", **_REFERENCE),
    AttackSpec(
        "autoattack_torchattacks",
        autoattack_torchattacks,
        "linf",
        **_TORCHATTACKS,
        black_box_part=True,
        steps_from=("n_iter", 100),
    ),
    AttackSpec("pgd_torchattacks", pgd_torchattacks, "linf", **_TORCHATTACKS),
):
    register_attack(_spec)
