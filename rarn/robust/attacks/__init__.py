"""Adversarial attacks behind one registered interface (spec section 6.1).

Every attack solves Eq. (1) of the spec, ``x_adv = argmax_{||x' - x||_p <= eps} L(F(x'), y)``,
approximately and has the signature ``attack(model, x, y, *, eps, step_size, steps, generator)
-> x_adv`` (inputs NCHW in [0, 1], the model returns logits). The modules, by idea:

* :mod:`~rarn.robust.attacks.interface`: the signature, the argument checks and the one wrapper
  (checks, eval mode, grad mode, default generator) every attack wears.
* :mod:`~rarn.robust.attacks.gradient`: white-box FGSM, PGD in L-inf and L2, MIM and CW-inf.
* :mod:`~rarn.robust.attacks.adaptive`: BPDA (straight-through) and EOT PGD, the adaptive
  attacks run when a gradient-masking check fires.
* :mod:`~rarn.robust.attacks.black_box`: the Square-style random search, the masking check.
* :mod:`~rarn.robust.attacks.external`: the reference AutoAttack (Croce and Hein 2020,
  ``pyautoattack``; L-inf and L2, standard and rand), and torchattacks' PGD and AutoAttack
  assembly, imported lazily so that ``rarn`` imports without them.
* :mod:`~rarn.robust.attacks.registry`: one :class:`AttackSpec` per attack, looked up with
  :func:`get_attack`; ``ATTACKS``, ``ATTACK_NORM`` and ``ATTACK_IMPL`` are views of it.
"""

from rarn.robust.attacks.adaptive import bpda, bpda_surrogate, pgd_eot
from rarn.robust.attacks.black_box import square
from rarn.robust.attacks.external import (
    autoattack,
    autoattack_l2,
    autoattack_torchattacks,
    pgd_torchattacks,
    recording_components,
)
from rarn.robust.attacks.gradient import (
    cw,
    cw_margin_loss,
    fgsm,
    input_gradient,
    mim,
    pgd,
    pgd_l2,
)
from rarn.robust.attacks.interface import AttackFn, Budget, uniform_attack, validate_attack_args
from rarn.robust.attacks.registry import (
    ATTACK_IMPL,
    ATTACK_NORM,
    ATTACKS,
    AttackSpec,
    attack_spec,
    get_attack,
    register_attack,
)

__all__ = [
    "ATTACKS",
    "ATTACK_IMPL",
    "ATTACK_NORM",
    "AttackFn",
    "AttackSpec",
    "Budget",
    "attack_spec",
    "autoattack",
    "autoattack_l2",
    "autoattack_torchattacks",
    "bpda",
    "bpda_surrogate",
    "cw",
    "cw_margin_loss",
    "fgsm",
    "get_attack",
    "input_gradient",
    "mim",
    "pgd",
    "pgd_eot",
    "pgd_l2",
    "pgd_torchattacks",
    "recording_components",
    "register_attack",
    "square",
    "uniform_attack",
    "validate_attack_args",
]
