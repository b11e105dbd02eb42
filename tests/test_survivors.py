"""AutoAttack only on the images every earlier attack failed to break (issue 20, item 1): the
entry option ``survivors``, its defaults and checks, the exact worst case, and what AutoAttack
is shown.

The model makes the worst case exact whatever AutoAttack draws: a linear two-class score that
FGSM at eps 0.3 flips on every unmarked image (the L1 norm of its weights times eps exceeds any
margin), plus 100 on the class-0 logit of images whose first pixel is 1 (a mark no attack within
eps < 0.5 can undo). So every unmarked image is broken by FGSM, every marked one by nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import rarn.robust.evaluation._core as core
from rarn.config import ConfigError, config_to_dict, load_config, with_overrides
from rarn.robust.evaluation import (
    SuiteSettings,
    evaluate_robustness,
    named_suite,
    records_table,
    worst_case_from_records,
)
from rarn.robust.evaluation.named import SURVIVORS_BY_DEFAULT, NamedAttack

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
EPS = 0.3
RUN = {"eps": EPS, "step_size": 0.1, "steps": 2, "checks": False, "eps_curve": (), "batch_size": 8}
AA_CHEAP = {"n_iter": 2, "n_queries": 5}


class _Marked(nn.Module):
    """Class 1 - class 0 = w . x on unmarked images; marked ones: class 0 by 100."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.tensor([1.0, -1.0]).repeat(24)
        w[0] = 0.0  # the mark's pixel
        self.register_buffer("w", w)

    def forward(self, x: Tensor) -> Tensor:
        s = x.flatten(1) @ self.w
        mark = 100.0 * (x[:, 0, 0, 0].detach() > 0.5).to(x.dtype)
        rest = torch.full((len(x), 8), -100.0)
        return torch.cat([(-s / 2 + mark)[:, None], (s / 2)[:, None], rest], dim=1)


def _data(n: int = 16, marked: tuple[int, ...] = (1, 4, 5, 9, 12)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(n, 3, 4, 4, generator=g)  # no clipping within eps 0.3
    x[:, 0, 0, 0] = 0.0
    x[list(marked), 0, 0, 0] = 1.0
    with torch.no_grad():
        y = _Marked()(x).argmax(1)
    y[0] = 1 - y[0]  # one image misclassified clean
    return x, y


def _suite(aa: dict) -> tuple:
    return ("fgsm", "pgd", {"name": "aa", "attack": "autoattack", **aa})


def _watch(monkeypatch, *, fake: bool) -> list[Tensor]:
    """The images AutoAttack receives, per call (the registry attack, wrapped); ``fake``: it is
    PGD under AutoAttack's name (no pyautoattack, the same for every image it is shown)."""
    calls: list[Tensor] = []
    real = core.get_attack

    def get_attack(name):
        if name != "autoattack":
            return real(name)
        fn = real("pgd" if fake else name)

        def wrapped(model: nn.Module, x: Tensor, y: Tensor, **kw: object) -> Tensor:
            calls.append(x.detach().clone())
            return fn(model, x, y, **kw)

        return wrapped

    monkeypatch.setattr(core, "get_attack", get_attack)
    return calls


# --- the option: defaults, checks, the config ----------------------------------------------


def test_defaults_true_for_the_autoattack_family_only():
    shared = {"eps": EPS, "step_size": 0.1, "steps": 2}
    from rarn.robust.attacks import ATTACKS

    assert set(SURVIVORS_BY_DEFAULT) == {a for a in ATTACKS if a.startswith("autoattack")}
    named = named_suite(list(ATTACKS), shared)
    assert {a.attack for a in named if a.survivors} == set(SURVIVORS_BY_DEFAULT)
    assert NamedAttack("x", "autoattack").survivors and not NamedAttack("x", "pgd").survivors
    entries = [{"name": "p", "attack": "pgd", "survivors": True},
               {"name": "a", "attack": "autoattack", "survivors": False}]  # fmt: skip
    p, a = named_suite(entries, shared)
    assert (p.survivors, a.survivors) == (True, False)
    assert named_suite([p, a], shared) == (p, a)  # a resolved entry keeps it


@pytest.mark.parametrize("bad", ["yes", 1, 0.0, None])
def test_a_survivors_of_the_wrong_type_is_an_error_naming_it(bad):
    entry = {"name": "aa", "attack": "autoattack", "survivors": bad}
    with pytest.raises(ConfigError, match=r"attacks\[1\]\.survivors: expected bool"):
        named_suite(["pgd", entry], {"eps": EPS, "step_size": 0.1, "steps": 2})
    with pytest.raises(ConfigError, match=r"evaluation\.suite\[0\]\.survivors"):
        load_config(SMOKE, ["evaluation.suite=[{name: aa, attack: autoattack, survivors: 3}]"])


def test_survivors_round_trips_through_the_config():
    from pipeline.evaluate import protocol_sha256

    off = "evaluation.suite=[{name: aa, attack: autoattack, n: 10, survivors: false}]"
    on = "evaluation.suite=[{name: aa, attack: autoattack, n: 10}]"
    cfg_off, cfg_on = load_config(SMOKE, [off]), load_config(SMOKE, [on])
    assert config_to_dict(cfg_off)["evaluation"]["suite"][0]["survivors"] is False
    again = with_overrides(cfg_off, {"evaluation.seed": 3})
    assert again.evaluation.suite[0]["survivors"] is False
    aa_off = SuiteSettings.from_config(cfg_off.evaluation).attacks[-1]
    aa_on = SuiteSettings.from_config(cfg_on.evaluation).attacks[-1]
    assert (aa_off.name, aa_off.n, aa_off.survivors, aa_on.survivors) == ("aa", 10, False, True)
    # part of the protocol: the default (survivors, unwritten) differs from survivors: false
    assert protocol_sha256(cfg_on.evaluation) != protocol_sha256(cfg_off.evaluation)


# --- what AutoAttack is shown ----------------------------------------------------------------


def test_autoattack_receives_exactly_the_survivors(monkeypatch):
    seen = _watch(monkeypatch, fake=True)
    x, y = _data()
    r_on = evaluate_robustness(_Marked(), (x, y), attacks=_suite({"n": 12}), **RUN)
    on = torch.cat(seen)
    seen.clear()
    r_off = evaluate_robustness(
        _Marked(), (x, y), attacks=_suite({"n": 12, "survivors": False}), **RUN
    )
    off = torch.cat(seen)
    earlier = r_on.correct & r_on.survived["fgsm"] & r_on.survived["pgd"]
    assert earlier.nonzero().flatten().tolist() == [1, 4, 5, 9, 12]  # the marked ones
    expected = earlier & (torch.arange(16) < 12)
    assert torch.equal(r_on.attacked["aa"], expected)
    assert torch.equal(on, x[expected])  # the survivors of its subset, nothing else
    assert len(on) == 4 < len(off) == 11  # marked 1, 4, 5, 9 of 0..11; clean-correct 1..11
    assert torch.equal(off, x[r_off.correct & (torch.arange(16) < 12)])
    assert r_on.survivors == ("aa",) and r_off.survivors == ()


def test_worst_case_and_records_are_those_of_survivors_false(monkeypatch):
    _watch(monkeypatch, fake=True)
    x, y = _data()
    r_on = evaluate_robustness(_Marked(), (x, y), attacks=_suite({"n": 12}), **RUN)
    r_off = evaluate_robustness(
        _Marked(), (x, y), attacks=_suite({"n": 12, "survivors": False}), **RUN
    )
    assert torch.equal(r_on.robust, r_off.robust)
    assert r_on.worst_case_accuracy == r_off.worst_case_accuracy == 5 / 16
    # the entry's row: robust to it and to every earlier attack, over its subset
    both = r_on.correct & r_on.survived["fgsm"] & r_on.survived["pgd"] & r_on.survived["aa"]
    assert r_on.robust_accuracy["aa"] == int(both[:12].sum()) / 12
    # skipped (fooled earlier) is decided: the records recombine to the headline
    table = records_table([r_on])
    assert torch.equal(worst_case_from_records(table)["model"], r_on.robust)
    modes = {(r["attack"], r["mode"]) for r in table.to_pylist()}
    assert modes == {("clean", "per_attack"), ("fgsm", "per_attack"),
                     ("pgd", "per_attack"), ("aa", "survivors")}  # fmt: skip
    with pytest.raises(ValueError, match="undetermined|skipped"):
        worst_case_from_records(table, attacks=["aa"])  # the earlier attacks decided those
    rows = {r["attack"]: r for r in r_on.to_table().to_pylist()}
    assert (rows["aa"]["survivors"], rows["pgd"]["survivors"]) == (True, False)
    assert rows["worst_case"]["survivors"] is None
    assert rows["worst_case"]["coverage"] == "aa on 12 of 16"


def test_the_reference_autoattack_gives_the_same_worst_case(monkeypatch):
    pytest.importorskip("pyautoattack")
    seen = _watch(monkeypatch, fake=False)
    x, y = _data()
    aa = {"n": 12, **AA_CHEAP}
    r_on = evaluate_robustness(_Marked(), (x, y), attacks=_suite(aa), **RUN)
    n_on = sum(len(c) for c in seen)
    r_off = evaluate_robustness(
        _Marked(), (x, y), attacks=_suite({**aa, "survivors": False}), **RUN
    )
    assert torch.equal(r_on.robust, r_off.robust)  # exact: the model leaves AA nothing to draw
    assert n_on == 4 < sum(len(c) for c in seen) - n_on == 11
