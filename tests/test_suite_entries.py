"""Named attacks with their own parameters (issue 9, item 2) and AutoAttack on a recorded subset
as the headline (item 1): the library, the config checks, and the pipeline's evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import rarn.robust.evaluation.evidence as evidence
from rarn.config import ConfigError, EvaluationConfig, load_config
from rarn.robust.evaluation import (
    MASKING_FLAGS,
    SuiteSettings,
    evaluate_robustness,
    named_suite,
    records_table,
    worst_case_from_records,
    write_records,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
# no eps curve unless a test asks for one (the default is the config's curve)
SMALL = {"eps": 0.1, "step_size": 0.025, "steps": 5, "checks": False, "batch_size": 40}
SMALL["eps_curve"] = ()
SIDE_BY_SIDE = (
    "fgsm",
    {"name": "pgd20", "attack": "pgd", "steps": 20},
    {"name": "pgd100", "attack": "pgd", "steps": 100},
    {"name": "mim", "attack": "mim", "steps": 10, "decay": 0.5},
    {"name": "cw30", "attack": "cw", "steps": 30, "kappa": 20.0},
)


@pytest.fixture(scope="module")
def digits(digits_net_trainer):
    model, x, y = digits_net_trainer()
    return model, x[:96], y[:96]


def _stored(result, tmp_path, attack="worst_case"):
    back = pq.read_table(write_results(result.to_table(), tmp_path / "results.parquet"))
    row = back.filter(pc.equal(back.column("attack"), attack)).to_pylist()[0]
    return row["accuracy"], row["n"]


# --- named attacks side by side -------------------------------------------------------------


def test_pgd20_and_pgd100_side_by_side_with_their_settings(digits, tmp_path):
    model, x, y = digits
    r = evaluate_robustness(model, (x, y), attacks=SIDE_BY_SIDE, main_attack="pgd20", **SMALL)
    assert r.attacks == ("fgsm", "pgd20", "pgd100", "mim", "cw30")
    assert r.params["pgd100"]["steps"] == 100 and r.params["pgd20"]["steps"] == 20
    assert r.method("pgd100") == "pgd" and r.method("fgsm") == "fgsm"
    # A converged attack on a healthy net: 5x the steps gains at most a couple of images.
    assert r.robust_accuracy["pgd100"] <= r.robust_accuracy["pgd20"] + 2 / 96
    rows = {row["attack"]: row for row in r.to_table().to_pylist()}
    assert (rows["pgd100"]["method"], rows["pgd100"]["steps"]) == ("pgd", 100)
    assert (rows["cw30"]["method"], rows["cw30"]["steps"]) == ("cw", 30)
    assert rows["worst_case"]["suite"] == "fgsm+pgd20+pgd100+mim+cw30"
    rec = {row["attack"]: row for row in records_table([r]).to_pylist() if row["image"] == 0}
    assert rec["mim"]["decay"] == 0.5 and rec["cw30"]["kappa"] == 20.0
    assert (
        rec["pgd100"]["method"] == "pgd" and json.loads(rec["pgd100"]["settings"])["steps"] == 100
    )
    back = pq.read_table(write_records(records_table([r]), tmp_path / "records.parquet"))
    mask = worst_case_from_records(back)["model"]
    assert int(mask.sum()) / len(mask) == _stored(r, tmp_path)[0]


@pytest.mark.parametrize(
    "entries, kwargs, needle",
    [
        (("pgd", {"name": "x", "attack": "deepfool"}), {}, "attacks[1].attack"),
        (({"name": "p", "attack": "pgd", "decay": 1.0},), {}, "unknown parameter 'decay'"),
        (({"name": "p", "attack": "pgd", "eps": 1.5},), {}, "attacks[0].eps"),
        (({"name": "p", "attack": "pgd_l2", "eps": 600.0},), {}, "(0, 512]"),
        (({"name": "p", "attack": "pgd", "steps": 2.5},), {}, "expected int"),
        (({"name": "a", "attack": "autoattack", "version": "plus"},), {}, "standard"),
        (("pgd", {"name": "pgd", "attack": "pgd", "steps": 9}), {}, "listed twice"),
        (({"name": "worst_case", "attack": "pgd"},), {}, "worst_case"),
        (("square",), {}, "no white-box attack"),
        ((), {}, "at least one"),
        (("pgd",), {"attack_kwargs": {"pgd": {"n": -1}}}, "attacks[0].n"),
    ],
)
def test_bad_entries_fail_before_any_work(digits, monkeypatch, entries, kwargs, needle):
    model, x, y = digits
    called = []
    monkeypatch.setattr(model, "forward", lambda *a: called.append(1))
    with pytest.raises((ValueError, KeyError)) as info:
        evaluate_robustness(model, (x, y), attacks=entries, **{**SMALL, **kwargs})
    assert needle in str(info.value) and not called


def test_entries_resolve_the_same_from_names_mappings_and_records():
    shared = {"eps": 0.1, "step_size": 0.02, "steps": 7}
    by_name = named_suite(["pgd"], shared)
    by_map = named_suite([{"attack": "pgd"}], shared)
    again = named_suite(by_map, shared)
    assert by_name == by_map == again
    assert dict(by_name[0].params) == {"eps": 0.1, "step_size": 0.02, "steps": 7}
    kappa = named_suite([{"name": "cw", "attack": "cw", "kappa": float("inf")}], shared)
    assert kappa[0].params["kappa"] == float("inf")  # CW's own default: no clamp


# --- a subset for the expensive attack ----------------------------------------------------------


@pytest.mark.parametrize("per_attack", [True, False], ids=["per_attack", "survivors"])
def test_an_attack_on_a_subset_enters_the_headline_on_its_images(digits, tmp_path, per_attack):
    """The headline is over every image: an attack on the first 40 can only lower it there."""
    model, x, y = digits
    entries = ("fgsm", "pgd", {"name": "expensive", "attack": "mim", "n": 40})
    r = evaluate_robustness(model, (x, y), attacks=entries, per_attack=per_attack, **SMALL)
    assert (r.n, r.worst_case_n, r.subset("expensive"), r.subset("pgd")) == (96, 96, 40, 96)
    expected = r.correct & r.survived["fgsm"] & r.survived["pgd"]
    expected[:40] &= r.survived["expensive"][:40] | ~r.attacked["expensive"][:40]
    assert torch.equal(r.robust, expected)
    assert not r.attacked["expensive"][40:].any()  # never shown the rest
    assert _stored(r, tmp_path) == (r.worst_case_accuracy, 96)
    assert r.coverage_text() == "expensive on 40 of 96"
    if per_attack:
        assert r.attacked["pgd"][40:].any()  # the other attacks see every image
        acc = int(r.survived["expensive"][:40].sum()) / 40
        assert _stored(r, tmp_path, "expensive") == (acc, 40)
    # The records mark what the subset attack saw, and recombine to the stored headline.
    rows = records_table([r]).to_pylist()
    seen = {
        row["image"] for row in rows if row["attack"] == "expensive" and row["robust"] is not None
    }
    assert seen and max(seen) < 40
    assert {row["subset_n"] for row in rows if row["attack"] == "expensive"} == {40}
    assert {row["subset_n"] for row in rows if row["attack"] == "pgd"} == {96}
    back = pq.read_table(write_records(records_table([r]), tmp_path / "records.parquet"))
    mask = worst_case_from_records(back)["model"]
    assert torch.equal(mask, r.robust)
    assert int(mask.sum()) / len(mask) == _stored(r, tmp_path)[0]
    without = worst_case_from_records(back, attacks=("fgsm", "pgd"))["model"]
    assert len(without) == 96  # the full-data attacks alone: every image


def test_a_subset_larger_than_the_data_is_all_of_it(digits):
    model, x, y = digits
    r = evaluate_robustness(model, (x, y), attacks=("pgd", {"attack": "fgsm", "n": 500}), **SMALL)
    assert r.worst_case_n == 96 and r.subset("fgsm") == 96


# --- the suite's own evidence for the masking checks ----------------------------------------


def test_suite_pgd_with_more_steps_feeds_the_more_steps_check(digits, monkeypatch):
    """PGD-2 beside PGD-50 in the suite: the gap is evidence of an unconverged attack."""
    model, x, y = digits
    monkeypatch.setattr(
        evidence, "run_masking_checks", lambda *a, **k: dict.fromkeys(MASKING_FLAGS, False)
    )
    entries = (
        {"name": "pgd2", "attack": "pgd", "steps": 2, "step_size": 0.01},
        {"name": "pgd50", "attack": "pgd", "steps": 50},
    )
    settings = {**SMALL, "checks": True, "check_n": 16, "adaptive": False}
    with pytest.warns(Warning, match="more PGD steps"):
        r = evaluate_robustness(model, (x, y), attacks=entries, **settings)
    assert r.robust_accuracy["pgd50"] < r.robust_accuracy["pgd2"] - 0.03
    assert r.flags["more_steps_stronger"] is True


# --- the config: named entries checked at load time -----------------------------------------


@pytest.mark.parametrize(
    "override, needles",
    [
        ("evaluation.suite=[{name: x, attack: deepfool}]", ["evaluation.suite[0].attack", "pgd"]),
        ("evaluation.suite=[{name: x, attack: pgd, decay: 1}]", ["evaluation.suite[0]", "decay"]),
        (
            "evaluation.suite=[{name: x, attack: pgd, eps: 2}]",
            ["evaluation.suite[0].eps", "(0, 1]"],
        ),
        ("evaluation.suite=[{name: x, attack: pgd_l2, eps: 0}]", ["evaluation.suite[0].eps"]),
        ("evaluation.suite=[{name: fgsm, attack: pgd}]", ["evaluation.suite[0]", "twice"]),
        ("evaluation.suite=[{name: x, attack: cw, kappa: no}]", ["evaluation.suite[0].kappa"]),
        ("evaluation.suite=[{name: a, attack: autoattack, n: -3}]", ["evaluation.suite[0].n"]),
        ("evaluation.suite=[pgd]", ["evaluation.suite[0]", "mapping"]),
        ("evaluation.attacks=[square]", ["evaluation.attacks", "white-box"]),
        ("evaluation.more_steps_factor=1", ["evaluation.more_steps_factor", "[2, 100]"]),
        ("evaluation.check_n=0", ["evaluation.check_n"]),
    ],
)
def test_config_rejects_bad_entries_naming_the_key(override, needles):
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, [override])
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_pipeline_exits_2_and_writes_nothing_for_a_bad_suite(tmp_path, monkeypatch, capsys):
    from pipeline.run import main

    monkeypatch.chdir(tmp_path)
    override = "evaluation.suite=[{name: aa, attack: autoattack, n_queries: 0}]"
    rc = main(["--config", SMOKE, "--quiet", f"run_dir={tmp_path}/run", override])
    assert rc == 2
    assert "evaluation.suite[0].n_queries" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["default.yaml", "cifar10_subset.yaml", "cifar10.yaml"])
def test_default_suites_hold_standard_autoattack_on_a_recorded_subset(name):
    ev = load_config(ROOT / "configs" / name).evaluation
    s = SuiteSettings.from_config(ev)
    aa = [a for a in named_suite(s.attacks, {"eps": ev.eps, "step_size": 1, "steps": 1})]
    aa = [a for a in aa if a.attack == "autoattack"]
    assert len(aa) == 1 and (aa[0].n == 0 if name == "cifar10.yaml" else aa[0].n > 0)  # GPU: all
    assert "n_iter" not in aa[0].params and "n_queries" not in aa[0].params  # the standard budget
    assert s.main_attack == "pgd" and s.more_steps_factor == ev.more_steps_factor
    full = SuiteSettings.from_config(EvaluationConfig())
    assert (full.attacks[-1].attack, full.attacks[-1].n) == ("autoattack", 0)  # every image


# --- the pipeline's evaluation: both tables, the headline recomputed from the records -------


def test_evaluate_model_headline_is_the_recombined_worst_case(digits, tmp_path):
    pytest.importorskip("pyautoattack")
    from pipeline.evaluate import RECORDS, evaluate_model, summary_metrics

    model, x, y = digits
    aa = "{name: aa, attack: autoattack, n: 24, n_iter: 5, n_queries: 30}"
    ev = load_config(SMOKE, [f"evaluation.suite=[{aa}]", "evaluation.check_n=32"]).evaluation
    result, parquet, _ = evaluate_model(model, (x, y), ev, name="m", out_dir=tmp_path)
    metrics = summary_metrics(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy_vs_eps.png",
        RECORDS,
        "results.parquet",
    ]
    assert (metrics["eval_worst_case_n"], metrics["eval_n"], metrics["eval_aa_n"]) == (96, 96, 24)
    ci = result.interval()
    assert (metrics["eval_worst_case_lo"], metrics["eval_worst_case_hi"]) == (ci.low, ci.high)
    assert metrics["eval_worst_case_lo"] < metrics["eval_worst_case_acc"]
    mask = worst_case_from_records(pq.read_table(tmp_path / RECORDS))["m"]
    assert int(mask.sum()) / len(mask) == metrics["eval_worst_case_acc"]
    aa_row = [r for r in pq.read_table(parquet).to_pylist() if r["attack"] == "aa"][0]
    assert (aa_row["method"], aa_row["n"], aa_row["steps"]) == ("autoattack", 24, 5)


# --- the full-set companion of a subset headline ---------------------------------------------


def test_full_set_worst_case_uses_every_image_without_the_subset_attacks(digits):
    from pipeline.evaluate import full_set_metrics, summary_metrics

    model, x, y = digits
    suite = ("fgsm", "pgd", {"name": "pgd_sub", "attack": "pgd", "steps": 40, "n": 16})
    r = evaluate_robustness(model, (x, y), attacks=suite, **SMALL)
    m = summary_metrics(r)
    assert m["eval_worst_case_n"] == 96  # the headline rests on every image
    assert m["eval_worst_case_full_n"] == 96
    both = r.correct & r.survived["fgsm"] & r.survived["pgd"]  # per_attack: each ran on all
    assert m["eval_worst_case_full_acc"] == pytest.approx(float(both.float().mean()))
    assert m["eval_worst_case_full_acc"] <= min(r.robust_accuracy["fgsm"], r.robust_accuracy["pgd"])
    # Without a subset attack there is no companion: the headline already uses every image.
    assert full_set_metrics(evaluate_robustness(model, (x, y), attacks=("fgsm",), **SMALL)) == {}
