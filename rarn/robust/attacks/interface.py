"""The uniform attack interface: one signature, one argument check, one wrapper.

Every attack has the signature ``attack(model, x, y, *, eps, step_size, steps, generator) ->
x_adv`` (inputs NCHW in [0, 1], the model returns logits), as in torchattacks. The checks, the
model's train/eval mode (:func:`rarn.models.common.eval_mode`), ``torch.enable_grad`` and the
default generator live in :func:`uniform_attack`, so an attack body is only its update rule and
receives the checked budget as one :class:`Budget`. Randomness comes from an explicit
``torch.Generator``; ``None`` means a generator seeded with 0 (deterministic, not fresh).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from rarn.models.common import eval_mode

__all__ = ["AttackFn", "Budget", "uniform_attack", "validate_attack_args"]


class AttackFn(Protocol):
    """``attack(model, x, y, *, eps, step_size, steps, generator, **extras) -> x_adv``.

    Args:
        model: classifier returning logits (N, K); its modes and ``requires_grad`` flags are
            restored afterwards.
        x: clean inputs (N, C, H, W) in [0, 1].
        y: labels (N,).
        eps: radius of the threat model, in the attack's norm (L-inf or L2).
        step_size: step per iteration.
        steps: number of iterations (queries, for a black-box attack).
        generator: all the attack's randomness (None: a generator seeded with 0).
        **extras: keyword arguments particular to the attack (see its docstring).

    Returns:
        Adversarial inputs (N, C, H, W) in [0, 1] within ``eps`` of ``x``, detached.
    """

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        eps: float,
        step_size: float,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class Budget:
    """The uniform arguments, checked, as an attack body receives them (never a None generator)."""

    eps: float
    step_size: float
    steps: int
    generator: torch.Generator


def _finite_positive(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def validate_attack_args(x: Tensor, y: Tensor, *, eps: float, step_size: float, steps: int) -> None:
    """Raise ``ValueError`` with a clear message unless the arguments of an attack are valid.

    Args:
        x: inputs, shape (N, C, H, W), floating point, values in [0, 1].
        y: integer labels, shape (N,).
        eps: radius of the threat model, finite and > 0.
        step_size: step per iteration, finite and > 0.
        steps: number of iterations, an int >= 1.

    Raises:
        ValueError: naming the offending argument and its value.
    """
    _finite_positive("eps", eps)
    _finite_positive("step_size", step_size)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point NCHW tensor, got {got}")
    if not isinstance(y, Tensor) or y.ndim != 1 or y.is_floating_point() or y.is_complex():
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be a 1-D integer tensor of labels, got {got}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x))  # one device sync; NaN fails both tests
        if not (lo >= 0 and hi <= 1):
            raise ValueError(
                f"x must lie in [0, 1] (attacks work in pixel space), got [{lo}, {hi}]"
            )


def uniform_attack(body: Callable[..., Tensor]) -> AttackFn:
    """Give an attack body the uniform interface of :class:`AttackFn`.

    The body is ``body(model, x, y, budget, **extras) -> x_adv``: it receives detached inputs, a
    :class:`Budget` and its own keyword-only extras, and is only the update rule. The wrapper
    checks the arguments (:func:`validate_attack_args`), fills in the default generator, returns
    a copy of an empty batch without calling the body, and runs the body in eval mode with
    gradients enabled (callers often evaluate under ``torch.no_grad()``; attacks need input
    gradients). Its signature, for ``help()`` and IDEs, is that of :class:`AttackFn` plus the
    body's extras.
    """

    def attack(model, x, y, *, eps, step_size, steps, generator=None, **extras):  # see AttackFn
        validate_attack_args(x, y, eps=eps, step_size=step_size, steps=steps)
        if x.shape[0] == 0:
            return x.detach().clone()
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        budget = Budget(float(eps), float(step_size), int(steps), generator)
        with eval_mode(model), torch.enable_grad():
            x_adv = body(model, x.detach(), y.detach(), budget, **extras)
        return x_adv.detach()

    functools.update_wrapper(attack, body)
    uniform = inspect.signature(AttackFn.__call__)
    own = inspect.signature(body).parameters.values()
    attack.__signature__ = uniform.replace(
        parameters=[
            *list(uniform.parameters.values())[1:],  # without self
            *(p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY),
        ]
    )
    return attack


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """U[0, 1) noise drawn on the generator's device, then moved to ``like``'s device."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return u.to(like.device)


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """N(0, 1) noise, drawn like :func:`_rand`."""
    u = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return u.to(like.device)
