"""Running the attack suite: clean, per-attack and worst-case robust accuracy of one model.

Implements the evaluation protocol of spec section 6.1: clean accuracy, robust accuracy under each
attack of :mod:`rarn.robust.attacks` (Eq. (1) of the spec), and the per-sample worst case over
the suite in the manner of AutoAttack (Croce and Hein 2020, https://arxiv.org/abs/2003.01690):
a boolean ``robust`` mask, robust accuracy ``robust.float().mean()``. What to run is one typed
:class:`SuiteSettings`; the two ways of running it (each attack alone, or each only on the
survivors of the earlier ones) are one function each. Every result carries the flags of the
gradient-masking checks (:mod:`rarn.robust.evaluation.masking`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rarn.models.common import device_of
from rarn.robust.attacks import (
    ATTACK_NORM,
    recording_components,
    validate_attack_args,
)
from rarn.robust.evaluation._core import (
    Data,
    _attack_preds,
    _batches,
    _fraction,
    _predict,
    _survives,
    attack_model,
    attack_seed,
    batch_generator,
    model_form,
)
from rarn.robust.evaluation.adaptive import adaptive_plan, flag_outcomes, run_adaptive
from rarn.robust.evaluation.evidence import masking_flags
from rarn.robust.evaluation.masking import check_larger_eps, unbounded_radius
from rarn.robust.evaluation.named import NamedAttack
from rarn.robust.evaluation.records import DataHasher, weights_sha256
from rarn.robust.evaluation.results import RobustnessResult
from rarn.robust.evaluation.settings import Plan, SuiteSettings, suite_plan

__all__ = ["evaluate_robustness"]

logger = logging.getLogger(__name__)


Records = dict[str, tuple[Tensor, Tensor, list[str | None]]]
"""Name -> per-image ``(attacked, predicted label after the attack or -1, component that broke
it)`` of one batch (the component: AutoAttack's, else None)."""


@dataclass
class _Tally:
    """What the batches add up to: per-image masks (on CPU), curve hits and the check subset."""

    attacks: tuple[str, ...]
    curve_hits: dict[float, int]
    survivors: tuple[str, ...] = ()  # those run only on the earlier ones' survivors
    n: int = 0
    correct: list[Tensor] = field(default_factory=list)
    clean_pred: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    attacked: dict[str, list[Tensor]] = field(default_factory=dict)
    preds: dict[str, list[Tensor]] = field(default_factory=dict)
    batches: dict[str, list[Tensor]] = field(default_factory=dict)
    components: dict[str, list[str | None]] = field(default_factory=dict)
    x_check: list[Tensor] = field(default_factory=list)
    y_check: list[Tensor] = field(default_factory=list)
    keep: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    data: DataHasher = field(default_factory=DataHasher)
    image_numel: int = 0

    def add(self, b: int, y: Tensor, pred: Tensor, records: Records) -> None:
        self.labels.append(y.cpu())
        self.clean_pred.append(pred.cpu())
        self.correct.append((pred == y).cpu())
        for name, (attacked, p, comp) in records.items():
            self.components.setdefault(name, []).extend(comp)
            self.attacked.setdefault(name, []).append(attacked.cpu())
            self.preds.setdefault(name, []).append(p.cpu())
            batch = torch.where(attacked, b, -1).cpu()
            self.batches.setdefault(name, []).append(batch)

    def masks(self) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """``correct``, and per attack ``attacked``, ``pred`` and ``batch`` over all batches."""
        cat = torch.cat
        return (
            cat(self.correct),
            {k: cat(v) for k, v in self.attacked.items()},
            {k: cat(v) for k, v in self.preds.items()},
            {k: cat(v) for k, v in self.batches.items()},
        )


def _worst(correct: Tensor, attacked: dict[str, Tensor], survived: dict[str, Tensor]) -> Tensor:
    """Per image: correct clean and not fooled by any attack that ran on it."""
    robust = correct.clone()
    for a, ran in attacked.items():
        robust &= survived[a] | ~ran
    return robust


def evaluate_robustness(
    model: nn.Module,
    data: Data,
    settings: SuiteSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    model_name: str = "model",
    device: torch.device | str | None = None,
    **overrides: Any,
) -> RobustnessResult:
    """Clean, per-attack and worst-case robust accuracy, the eps curve and the masking flags.

    Only clean-correct points are attacked (a misclassified point is never robust). With
    ``per_attack`` every attack runs alone on all clean-correct points of its subset, except an
    entry with ``survivors`` (AutoAttack's by default): it runs only on the points no earlier
    attack fooled, and its accuracy is robust to it and every earlier one; without
    ``per_attack``, AutoAttack-style, every attack runs that way (cheaper, but no per-attack
    numbers). Either way the worst case is the same: a skipped point was already fooled. The
    masking checks' attacks at the suite's eps (their PGD, PGD with more steps, FGSM and the
    black-box Square, on the first ``check_n`` images) and, when a check fires, the adaptive
    attacks (:mod:`~rarn.robust.evaluation.adaptive`) join them. The headline
    ``worst_case_accuracy`` is over **all** images: an image is robust
    when it is classified correctly and no attack that ran on it fooled it, so adding an attack
    can only lower it, and ``worst_case_accuracy <= min(robust_accuracy.values())`` for attacks
    that saw every image.

    Randomness: every attack (and curve point) draws from its own generator, seeded from the
    evaluation's seed (``generator``'s initial seed), the attack's name and the batch number
    (:func:`~rarn.robust.evaluation._core.batch_generator`), so one batch of one attack can be
    rerun alone (:func:`~rarn.robust.evaluation.verify_records`).

    Args:
        model: classifier returning logits; its train/eval mode is restored afterwards.
        data: a loader of ``(x, y, ...)`` batches or one ``(x, y)`` pair; x in [0, 1], NCHW.
        settings: what to run (default: ``SuiteSettings()``).
        generator: its initial seed seeds every attack (None: 0); its device is where the
            attacks draw.
        model_name: label for the results table.
        device: where to evaluate (None: the model's device).
        **overrides: fields of :class:`SuiteSettings` replacing those of ``settings``, e.g.
            ``evaluate_robustness(model, data, attacks=("pgd",), eps=0.1)``.

    Returns:
        A :class:`~rarn.robust.evaluation.results.RobustnessResult`.

    Raises:
        KeyError: an unknown attack name (listing the known ones).
        ValueError: invalid eps/step_size/steps, inputs outside [0, 1], or no data.
        TypeError: an override that is not a field of :class:`SuiteSettings`.
    """
    s = dataclasses.replace(settings or SuiteSettings(), **overrides)
    plan, curve_eps = suite_plan(s)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    seed, gdev = generator.initial_seed(), generator.device
    device = torch.device(device) if device is not None else device_of(model)
    net = attack_model(model, s.fold_batchnorm, device)  # the model, or its folded copy
    tally = _run_batches(net, data, s, plan, curve_eps, seed, gdev, device)
    rows = _Rows.of_suite(tally, plan, s.batch_size)
    runs: dict[str, tuple[str, dict[str, Any], Tensor]] = {}
    flags = masking_flags(net, s, plan, tally, rows.survived, generator, runs)
    m = len(torch.cat(tally.y_check)) if tally.y_check else 0
    for label, (method, p, pr) in runs.items():  # the checks' attacks at the suite's eps
        pad = torch.full((tally.n,), -1, dtype=torch.long)
        pad[:m] = pr.cpu()
        rows.add(label, pad >= 0, pad, torch.where(pad >= 0, 0, -1), p, method, m, m)
    main = plan[s.main_attack]
    norm = ATTACK_NORM[main.attack]
    curve = {e: tally.curve_hits[e] / tally.n for e in curve_eps}
    large = unbounded_radius(norm, tally.image_numel)
    if len(curve) >= 2 and check_larger_eps(curve, large_eps=large):
        flags["eps_not_decreasing"] = True  # before the adaptive plan: this flag calls for it too
    adaptive = adaptive_plan(flags, s, main, norm) if s.adaptive and tally.keep else ()
    outcomes = _adaptive_rows(net, adaptive, flags, tally, rows, s, seed, device, gdev)
    sources = {a: "suite" for a in tally.attacks} | {a: "check" for a in runs}
    sources |= {a.name: "adaptive" for a in adaptive}
    r = _result(model, model_name, s, tally, rows, curve, flags, sources, outcomes, seed)
    return dataclasses.replace(r, model_form=model_form(net))


@dataclass
class _Rows:
    """Per attack of the result (the suite's, then the checks', then the adaptive ones), what
    it reports; ``params``, ``methods`` and ``subsets`` also hold the curve's own attack."""

    names: list[str]
    correct: Tensor
    y: Tensor
    attacked: dict[str, Tensor]
    preds: dict[str, Tensor]
    batches: dict[str, Tensor]
    survived: dict[str, Tensor]
    params: dict[str, dict[str, Any]]
    methods: dict[str, str]
    subsets: dict[str, int]
    sizes: dict[str, int]

    @classmethod
    def of_suite(cls, tally: _Tally, plan: Plan, batch_size: int) -> _Rows:
        correct, attacked, preds, batches = tally.masks()
        y = torch.cat(tally.labels)
        return cls(
            list(tally.attacks), correct, y, attacked, preds, batches,
            survived={a: p == y for a, p in preds.items()},
            params={a.name: dict(a.params) for a in plan.values()},
            methods={a.name: a.attack for a in plan.values()},
            subsets={a.name: a.subset(tally.n) for a in plan.values()},
            sizes=dict.fromkeys(tally.attacks, batch_size),
        )  # fmt: skip

    def add(self, name: str, attacked: Tensor, pred: Tensor, batch: Tensor,
            params: dict[str, Any], method: str, subset: int, size: int) -> None:  # fmt: skip
        self.names.append(name)
        self.attacked[name], self.preds[name], self.batches[name] = attacked, pred, batch
        self.survived[name] = pred == self.y
        self.params[name], self.methods[name] = params, method
        self.subsets[name], self.sizes[name] = subset, size

    def robust(self) -> Tensor:
        return _worst(self.correct, self.attacked, self.survived)


def _adaptive_rows(
    model: nn.Module,
    adaptive: tuple[NamedAttack, ...],
    flags: dict[str, bool | None],
    tally: _Tally,
    rows: _Rows,
    s: SuiteSettings,
    seed: int,
    device: torch.device,
    gdev: torch.device,
) -> dict[str, str]:
    """Run the adaptive attacks on the images still robust, add their rows and return the flag
    outcomes (empty: none ran)."""
    if not adaptive:
        return {}
    index, xk, yk = (torch.cat(t) for t in zip(*tally.keep))
    done = run_adaptive(
        model, adaptive, index, xk, yk, rows.robust(),
        seed=seed, batch_size=s.batch_size, device=device, generator_device=gdev,
    )  # fmt: skip
    fooled = {}
    for a in adaptive:
        ran, pr, b = done[a.name]
        rows.add(a.name, ran, pr, b, dict(a.params), a.attack, tally.n, s.batch_size)
        fooled[a.name] = int((ran & ~rows.survived[a.name]).sum())
    return flag_outcomes(flags, adaptive, fooled, tally.n)


def _result(
    model: nn.Module,
    model_name: str,
    s: SuiteSettings,
    tally: _Tally,
    rows: _Rows,
    curve: dict[float, float],
    flags: dict[str, bool | None],
    sources: dict[str, str],
    outcomes: dict[str, str],
    seed: int,
) -> RobustnessResult:
    """The :class:`RobustnessResult` of the rows: per-attack numbers, worst case, records."""
    names, survived, subsets = rows.names, rows.survived, rows.subsets
    robust = rows.robust()
    per_attack = {a: _fraction(survived[a][: subsets[a]]) for a in names if a not in tally.attacks}
    if s.per_attack:
        per_attack = {a: _fraction(survived[a][: subsets[a]]) for a in tally.attacks} | per_attack
    per_attack = {a: v for a, v in per_attack.items() if not a.startswith("adaptive.")}
    return RobustnessResult(
        model_name=model_name,
        n=tally.n,
        clean_accuracy=_fraction(rows.correct),
        robust_accuracy=per_attack,
        worst_case_accuracy=_fraction(robust),
        robust=robust,
        attacks=tuple(names),
        params=rows.params,
        main_attack=s.main_attack,
        curve=curve,
        flags=flags,
        seed=seed,
        correct=rows.correct,
        attacked={a: rows.attacked[a] for a in names},
        survived={a: survived[a] for a in names},
        per_attack=s.per_attack,
        survivors=tally.survivors,
        data_sha256=tally.data.hexdigest(),
        methods=rows.methods,
        subsets=subsets,
        preds={a: rows.preds[a] for a in names},
        batches={a: rows.batches[a] for a in names},
        clean_pred=torch.cat(tally.clean_pred),
        labels=rows.y,
        seeds={a: attack_seed(seed, a) for a in names},
        batch_sizes=rows.sizes,
        sources=sources,
        outcomes=outcomes,
        weights_sha256=weights_sha256(model),
        components={a: c for a, c in tally.components.items() if any(c)},
    )


def _attack_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    correct: Tensor,
    b: int,
    seeds: dict[str, int],
    gdev: torch.device,
    suite: dict[str, tuple[NamedAttack, Tensor]],
    *,
    in_turn: bool,
) -> tuple[Records, Tensor]:
    """Every attack on the clean-correct points of its subset (``suite``: name -> entry, subset
    mask): alone (per-attack mode) or, ``in_turn`` (AutoAttack's way) or for an entry with
    ``survivors``, only on the points no earlier attack fooled. Each draws from its own generator
    for batch ``b``. Returns the records and where the batch is still robust."""
    records, robust = {}, correct
    for name, (a, seen) in suite.items():
        mask = (robust if in_turn or a.survivors else correct) & seen
        g = batch_generator(seeds[name], b, gdev)
        with recording_components() as holder:  # AutoAttack: the component that broke each
            pred = _attack_preds(model, a.attack, x, y, mask, g, a.params)
        comp: list[str | None] = [None] * len(y)
        for i, c in zip(mask.nonzero().squeeze(1).tolist(), holder[0] if holder else []):
            comp[i] = c
        records[name] = (mask, pred, comp)
        robust = robust & ((pred == y) | ~mask)
    return records, robust


def _run_batches(
    model: nn.Module,
    data: Data,
    s: SuiteSettings,
    plan: Plan,
    curve_eps: list[float],
    seed: int,
    gdev: torch.device,
    device: torch.device,
) -> _Tally:
    """Attack every batch (in the mode of ``s.per_attack``) and add up the masks and the curve."""
    names = tuple(plan)[: len(s.attacks)]  # the suite; then, maybe, the curve's own attack
    main = plan[s.main_attack]
    seeds = {a: attack_seed(seed, a) for a in names}
    tally = _Tally(attacks=names, curve_hits=dict.fromkeys(curve_eps, 0))
    tally.survivors = tuple(a for a in names if plan[a].survivors or not s.per_attack)
    keep = s.adaptive and s.checks and s.check_n > 0  # the survivors, for adaptive attacks
    for b, (xb, yb) in enumerate(_batches(data, s.batch_size)):
        xb, yb = xb.to(device), yb.to(device)
        validate_attack_args(xb, yb, eps=s.eps, step_size=s.step_size, steps=s.steps)
        tally.data.update(xb, yb)
        tally.image_numel = xb[0].numel() if len(xb) else tally.image_numel
        if tally.n < s.check_n:
            tally.x_check.append(xb[: s.check_n - tally.n])
            tally.y_check.append(yb[: s.check_n - tally.n])
        index = torch.arange(tally.n, tally.n + xb.shape[0], device=device)
        tally.n += xb.shape[0]
        pred = _predict(model, xb)
        correct = pred == yb
        suite = {a: (plan[a], index < plan[a].n if plan[a].n else index >= 0) for a in names}
        records, robust = _attack_batch(
            model, xb, yb, correct, b, seeds, gdev, suite, in_turn=not s.per_attack
        )
        if keep and robust.any():
            tally.keep.append((index[robust].cpu(), xb[robust].cpu(), yb[robust].cpu()))
        for e in curve_eps:
            reuse = s.per_attack and s.main_attack in records and main.n == 0
            reuse = reuse and not main.survivors  # else it saw only the earlier ones' survivors
            if reuse and math.isclose(e, main.params["eps"]):
                hits = records[s.main_attack][1] == yb  # the curve point is the attack alone
            else:
                step = main.params["step_size"] * e / main.params["eps"]
                p = {**main.params, "eps": e, "step_size": step}
                g = batch_generator(attack_seed(seed, f"curve@{e!r}"), b, gdev)
                hits = _survives(model, main.attack, xb, yb, correct, g, p)
            tally.curve_hits[e] += int(hits.sum())
        tally.add(b, yb, pred, records)
    if tally.n == 0:
        raise ValueError("no data: the loader yielded no points")
    return tally
