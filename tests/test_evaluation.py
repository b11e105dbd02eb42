"""Tests of rarn.robust.evaluation: worst case, masking flags, results tables, transfer, bad
input."""

from __future__ import annotations

import math
import re
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import rarn.robust.attacks as attacks
import rarn.robust.attacks.registry as attack_registry
from rarn.robust.evaluation import (
    MASKING_FLAGS,
    RESULTS_SCHEMA,
    TRANSFER_SCHEMA,
    GradientMaskingWarning,
    SuiteSettings,
    check_black_box,
    check_larger_eps,
    check_more_steps,
    evaluate_robustness,
    plot_accuracy_vs_eps,
    plot_transfer_heatmap,
    results_table,
    run_masking_checks,
    transfer_matrix,
    write_results,
)
from rarn.robust.evaluation.masking import (
    check_black_box_per_image,
    check_fgsm_vs_pgd,
    check_more_steps_stronger,
)

SUITE = ("fgsm", "pgd", "mim", "cw")
BUDGET = {"eps": 0.1, "step_size": 0.025, "steps": 10}  # digits: 8x8 in [0, 1]
SMALL = {**BUDGET, "eps_curve": ()}  # the suite's: no curve unless asked (the config's default)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits(digits_net_trainer):
    model, x, y = digits_net_trainer()
    return model, x[:160], y[:160]


@pytest.fixture(scope="module")
def result(digits):
    model, x, y = digits
    settings = SuiteSettings(
        attacks=SUITE,
        **BUDGET,
        eps_curve=(0.05, 0.1, 0.2),
        batch_size=64,
        check_n=128,
        black_box_queries=200,
    )
    return evaluate_robustness(
        model,
        (x, y),
        settings,
        generator=torch.Generator().manual_seed(0),
        model_name="digits-cnn",
    )


# --- models built to trigger one masking check each --------------------------------------------


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad  # gradients point the wrong way: white-box attacks walk uphill


class _OnDataGrad(torch.autograd.Function):
    """True gradients on the data (digits are multiples of 1/16), reversed anywhere else."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        on_grid = ((x * 16 - (x * 16).round()).abs() < 1e-4).flatten(1).all(dim=1)
        return torch.where(on_grid.view(-1, 1, 1, 1), grad, -grad)


class _SparseGrad(torch.autograd.Function):
    """Keeps a random 5 % of the gradient's coordinates: a slow, noisy ascent."""

    @staticmethod
    def forward(ctx, x, generator):
        ctx.generator = generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * (torch.rand(grad.shape, generator=ctx.generator) < 0.05), None


class Masked(nn.Module):
    """Wraps a classifier with one kind of gradient masking; the predictions of all but "noise"
    are those of the classifier (or its quantised input), only the gradients lie."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        if self.kind == "softmax":
            return self.net(x).softmax(dim=1)
        if self.kind == "quantize":
            return self.net(torch.round(x * 2) / 2)  # round(): zero gradient almost everywhere
        if self.kind == "noise":
            return self.net(x + 0.05 * torch.randn_like(x))
        if self.kind == "reverse":
            return self.net(_ReverseGrad.apply(x))
        if self.kind == "on_data":
            return self.net(_OnDataGrad.apply(x))  # FGSM starts on the data, PGD off it
        if self.kind == "sparse":
            return self.net(_SparseGrad.apply(x, self.generator))
        raise ValueError(self.kind)


# --- accuracy and worst case --------------------------------------------------------------------


def test_accuracies_and_worst_case(result):
    r = result
    assert r.n == 160 and r.robust.shape == (160,) and r.robust.dtype == torch.bool
    assert set(SUITE) <= set(r.robust_accuracy) and set(r.robust_accuracy) <= set(r.attacks)
    assert r.clean_accuracy > 0.9
    assert all(acc <= r.clean_accuracy for acc in r.robust_accuracy.values())
    assert r.worst_case_accuracy <= min(r.robust_accuracy.values())
    assert r.worst_case_accuracy == pytest.approx(float(r.robust.float().mean()))
    assert r.robust_accuracy["pgd"] <= r.robust_accuracy["fgsm"] + 0.02
    assert r.seed == 0


def test_healthy_model_raises_no_flag(result):
    assert result.flags == dict.fromkeys(MASKING_FLAGS, False)


def test_curve_decreases_with_eps(result):
    accs = [result.curve[e] for e in sorted(result.curve)]
    assert accs == sorted(accs, reverse=True) and accs[-1] < accs[0]
    assert result.curve[0.1] == pytest.approx(result.robust_accuracy["pgd"])  # reused, not rerun


def _spy_attack(calls):
    def spy(model, x, y, *, eps, step_size, steps, generator=None):
        calls.append(len(y))
        return attacks.pgd(
            model, x, y, eps=eps, step_size=step_size, steps=steps, generator=generator
        )

    return spy


@pytest.mark.parametrize("per_attack", [False, True])
def test_later_attacks_run_only_on_survivors(digits, monkeypatch, per_attack):
    model, x, y = digits
    calls = {"first": [], "second": []}
    for name in calls:  # the registry refuses duplicates; monkeypatch takes the spies out again
        spy = attacks.AttackSpec(name, _spy_attack(calls[name]), "linf", "test", "0")
        monkeypatch.setitem(attack_registry._REGISTRY, name, spy)
    r = evaluate_robustness(
        model,
        (x, y),
        attacks=("first", "second"),
        **SMALL,
        per_attack=per_attack,
        checks=False,
        batch_size=200,
    )
    n_correct = round(r.clean_accuracy * r.n)
    assert calls["first"] == [n_correct]  # only clean-correct points are attacked
    if per_attack:
        assert calls["second"] == [n_correct]
        assert set(r.robust_accuracy) == {"first", "second"}
    else:
        survivors = calls["second"][0]
        assert survivors < n_correct
        assert r.robust_accuracy == {}
    assert r.worst_case_accuracy <= min(r.robust_accuracy.values(), default=1.0)


def test_model_mode_restored(digits):
    model, x, y = digits
    model.train()
    try:
        evaluate_robustness(model, (x[:32], y[:32]), attacks=("fgsm",), **SMALL, checks=False)
        assert model.training
    finally:
        model.eval()


def test_loader_and_tensors_agree(digits):
    model, x, y = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    kw = {"attacks": ("fgsm",), **SMALL, "checks": False}
    a = evaluate_robustness(model, loader, **kw)
    b = evaluate_robustness(model, (x, y), batch_size=50, **kw)
    assert a.n == b.n == len(y)
    assert a.clean_accuracy == b.clean_accuracy
    assert a.robust_accuracy == b.robust_accuracy


# --- masking flags: one model per flag -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "match", "flag"),
    [
        ("softmax", "probabilities", "probability_outputs"),
        ("quantize", "exactly zero", "zero_gradients"),
        ("noise", "randomised", "randomized_outputs"),
        ("reverse", "more PGD steps", "steps_not_decreasing"),
        ("reverse", "larger eps", "eps_not_decreasing"),
        ("reverse", "black-box", "black_box_stronger"),
        ("sparse", "more PGD steps lower", "more_steps_stronger"),
        ("on_data", "FGSM beats PGD", "fgsm_beats_pgd"),
        ("quantize", "does not approach 0", "eps_not_decreasing"),
        ("quantize", "every white-box attack failed on", "black_box_breaks_robust"),
    ],
)
def test_flag(digits, kind, match, flag):
    """One masked model per flag: a GradientMaskingWarning matching ``match`` (others are
    expected) and the flag itself."""
    model, x, y = digits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags = run_masking_checks(
            Masked(model, kind),
            x,
            y,
            **BUDGET,
            generator=torch.Generator().manual_seed(0),
            black_box_queries=200,
        )
    msgs = [str(w.message) for w in caught if issubclass(w.category, GradientMaskingWarning)]
    assert any(re.search(match, m) for m in msgs), msgs
    assert flags[flag]


def test_flags_reach_the_results_table(digits):
    model, x, y = digits
    with pytest.warns(GradientMaskingWarning):
        r = evaluate_robustness(
            Masked(model, "softmax"),
            (x[:64], y[:64]),
            attacks=("pgd",),
            **SMALL,
            check_n=64,
            adaptive=False,  # the flags here; adaptive attacks: tests/test_adaptive.py
        )
    table = r.to_table()
    assert all(table.column("flag_probability_outputs").to_pylist())
    assert all(table.column("masking_suspected").to_pylist())


def test_pure_checks():
    with pytest.warns(GradientMaskingWarning):
        assert check_more_steps({1: 0.5, 10: 0.6})  # rises
    with pytest.warns(GradientMaskingWarning):
        assert check_more_steps({1: 0.9, 20: 0.89})  # flat
    assert not check_more_steps({1: 0.9, 20: 0.4})
    assert not check_more_steps({1: 0.03, 20: 0.02})  # broken model: flat but below the floor
    with pytest.warns(GradientMaskingWarning):
        assert check_larger_eps({0.03: 0.4, 0.06: 0.2, 0.1: 0.3})
    assert not check_larger_eps({0.03: 0.6, 0.06: 0.4, 0.5: 0.0})
    with pytest.warns(GradientMaskingWarning):
        assert check_black_box(white_box_acc=0.5, black_box_acc=0.3)
    assert not check_black_box(white_box_acc=0.3, black_box_acc=0.45)


def test_pure_checks_added_in_issue_9():
    with pytest.warns(GradientMaskingWarning, match="approach 0"):
        assert check_larger_eps({8 / 255: 0.60, 0.5: 0.55})  # decreasing, but not towards 0
    assert not check_larger_eps({8 / 255: 0.60, 0.5: 0.04})
    assert not check_larger_eps({0.5: 0.3, 2.0: 0.2}, large_eps=4.0)  # L2: 0.5 is not large
    with pytest.warns(GradientMaskingWarning):
        assert check_more_steps_stronger(0.95, 0.78, n=160)
    assert not check_more_steps_stronger(0.453, 0.430, n=128)  # the healthy digits net
    assert not check_more_steps_stronger(0.5, 0.4, n=10)  # one image: luck of a random start
    with pytest.warns(GradientMaskingWarning):
        assert check_fgsm_vs_pgd(0.506, 0.975, n=160)
    assert not check_fgsm_vs_pgd(0.506, 0.45, n=160)  # FGSM weaker: as it should be
    assert not check_fgsm_vs_pgd(0.40, 0.41)
    wb = torch.ones(100, dtype=torch.bool)
    bb = wb.clone()
    bb[:2] = False
    assert not check_black_box_per_image(wb, bb)  # two images: below MIN_POINTS
    bb[:5] = False
    with pytest.warns(GradientMaskingWarning, match="5 of 100"):
        assert check_black_box_per_image(wb, bb)
    big = torch.ones(1000, dtype=torch.bool)
    assert not check_black_box_per_image(big, torch.cat([bb, big[100:]]))  # 0.5 % < 1 %
    assert not check_black_box_per_image(~wb, bb)  # only images the white box failed on count
    wb_weak = torch.arange(100) < 40  # white box: 40 % robust; black box: 60 %, yet 5 images
    bb_weak = (torch.arange(100) >= 5) & (torch.arange(100) < 65)  # only it breaks
    assert not check_black_box(0.40, 0.60)
    with pytest.warns(GradientMaskingWarning):
        assert check_black_box_per_image(wb_weak, bb_weak)


@pytest.mark.parametrize(
    ("kind", "flag"),
    [
        ("quantize", "black_box_breaks_robust"),
        ("quantize", "eps_not_decreasing"),
        ("on_data", "fgsm_beats_pgd"),
    ],
)
def test_suite_flags_masking(digits, kind, flag):
    """Through evaluate_robustness: the suite's own per-image white-box evidence is used."""
    model, x, y = digits
    s = SuiteSettings(attacks=SUITE, **SMALL, check_n=96, black_box_queries=200, adaptive=False)
    with pytest.warns(GradientMaskingWarning):
        r = evaluate_robustness(Masked(model, kind), (x[:96], y[:96]), s)
    assert r.flags[flag]
    assert r.to_table().column(f"flag_{flag}").to_pylist()[0]


# --- results tables -----------------------------------------------------------------------------


def test_results_table_rows(result):
    rows = result.to_table().to_pylist()
    keys = [(r["model"], r["attack"], r["eps"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per model x attack x eps
    by_attack = {r["attack"]: r for r in rows if r["eps"] in (0.0, 0.1)}
    assert by_attack["clean"]["accuracy"] == result.clean_accuracy
    assert by_attack["worst_case"]["accuracy"] == result.worst_case_accuracy
    assert by_attack["worst_case"]["suite"].startswith("fgsm+pgd+mim+cw+check.pgd10+")
    assert by_attack["worst_case"]["coverage"] == "; ".join(
        f"{a} on 128 of 160" for a in result.attacks if a.startswith("check.")
    )  # the masking checks' attacks ran on the check subset
    lo, hi = by_attack["worst_case"]["ci_low"], by_attack["worst_case"]["ci_high"]
    assert lo < result.worst_case_accuracy < hi
    assert by_attack["fgsm"]["steps"] == 1
    assert by_attack["pgd"]["implementation"] == "rarn"
    assert sorted(r["eps"] for r in rows if r["attack"] == "pgd") == [0.05, 0.1, 0.2]
    assert {r["n"] for r in rows if not r["attack"].startswith("check.")} == {160}
    assert {r["seed"] for r in rows} == {0}


def test_parquet_round_trip(result, tmp_path):
    table = results_table([result, result])
    path = write_results(table, tmp_path / "sub" / "results.parquet")
    back = pq.read_table(path)
    assert back.schema.equals(RESULTS_SCHEMA, check_metadata=True)
    assert back.schema.field("accuracy").metadata[b"description"]
    assert back.equals(table)
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.parquet"]  # no temp file


def test_unchecked_result_with_a_64_bit_seed(digits, tmp_path):
    model, x, y = digits
    g = torch.Generator().manual_seed(2**64 - 1)  # torch seeds are uint64
    kw = {"attacks": ("fgsm",), **SMALL, "generator": g, "checks": False}
    r = evaluate_robustness(model, (x[:32], y[:32]), **kw)
    back = pq.read_table(write_results(r.to_table(), tmp_path / "r.parquet")).to_pylist()
    assert {row["seed"] for row in back} == {2**64 - 1}
    assert all(row["masking_suspected"] is None for row in back)  # unknown, not "clean"


def test_accuracy_vs_eps_plot(result, tmp_path):
    path = plot_accuracy_vs_eps(result.to_table(), tmp_path / "curve.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_transfer_matrix(digits, digits_net_trainer, tmp_path):
    model, x, y = digits
    other, _, _ = digits_net_trainer(seed=1, epochs=4)
    table = transfer_matrix(
        {"a": model, "b": other}, (x[:96], y[:96]), **BUDGET, generator=torch.Generator()
    )
    assert table.schema.equals(TRANSFER_SCHEMA) and table.num_rows == 4
    acc = {(r["source"], r["target"]): r["accuracy"] for r in table.to_pylist()}
    assert acc["a", "a"] < acc["b", "a"] and acc["b", "b"] < acc["a", "b"]  # white-box is stronger
    back = pq.read_table(write_results(table, tmp_path / "transfer.parquet"))
    assert back.schema.equals(TRANSFER_SCHEMA, check_metadata=True)
    assert plot_transfer_heatmap(table, tmp_path / "transfer.png").read_bytes()[:8] == PNG_MAGIC


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_attack_lists_known(digits):
    model, x, y = digits
    with pytest.raises(KeyError, match="known:.*fgsm"):
        evaluate_robustness(model, (x, y), attacks=("pgd", "deepfool"))
    with pytest.raises(KeyError, match="known:"):
        transfer_matrix({"a": model}, (x, y), attack="nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": 0.0},
        {"eps": -8 / 255},
        {"eps": math.nan},
        {"steps": 0},
        {"eps_curve": (0.0,)},
        {"more_steps_factor": 1},
    ],
)
def test_bad_parameters_raise_before_any_work(digits, kwargs, monkeypatch):
    model, x, y = digits
    called = []
    monkeypatch.setattr(model, "forward", lambda *a: called.append(1))
    with pytest.raises(ValueError):
        evaluate_robustness(model, (x, y), **{**SMALL, **kwargs})
    assert not called


def test_settings_and_keyword_overrides(digits):
    model, x, y = digits
    s = SuiteSettings(attacks=["fgsm"], eps_curve=[0.2, 0.1], attack_kwargs=None)
    assert s.attacks == ("fgsm",) and s.eps_curve == (0.2, 0.1) and s.attack_kwargs == {}
    with pytest.raises(TypeError):
        evaluate_robustness(model, (x, y), s, no_such_setting=1)


def test_empty_data_raises(digits):
    model, _, _ = digits
    with pytest.raises(ValueError, match="no data"):
        evaluate_robustness(model, [], **SMALL)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long())
    with pytest.raises(ValueError, match="no data"):
        evaluate_robustness(model, torch.utils.data.DataLoader(empty), **SMALL)


def test_inputs_outside_unit_range_raise(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_robustness(model, (x * 16, y), **SMALL)


def test_nothing_written_for_bad_tables(result, tmp_path):
    empty = result.to_table().slice(0, 0)
    with pytest.raises(ValueError, match="empty"):
        write_results(empty, tmp_path / "a.parquet")
    wrong = pa.table({"model": ["m"], "accuracy": [0.5]})
    with pytest.raises(ValueError, match="schema"):
        write_results(wrong, tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="schema"):
        plot_accuracy_vs_eps(wrong, tmp_path / "c.png")
    only_clean = result.to_table().filter(pa.compute.equal(pa.compute.field("attack"), "clean"))
    with pytest.raises(ValueError, match="two or more radii"):
        plot_accuracy_vs_eps(only_clean, tmp_path / "d.png")
    assert list(tmp_path.iterdir()) == []
