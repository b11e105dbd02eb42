"""Tests of rarn.robust.evaluation.records: one row per image x attack, the attack settings, the
data's sha256, and worst cases recombined from the rows exactly as stored."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from rarn.robust.evaluation import (
    RECORDS_SCHEMA,
    DataHasher,
    data_sha256,
    evaluate_robustness,
    records_table,
    worst_case_from_records,
    write_records,
    write_results,
)

# no eps curve unless a test asks for one (the default is the config's curve)
SMALL = {"eps": 0.1, "step_size": 0.025, "steps": 5, "checks": False, "batch_size": 40}
SMALL["eps_curve"] = ()
SUITE = ("fgsm", "pgd", "mim", "cw")


@pytest.fixture(scope="module")
def digits(digits_net_trainer):
    model, x, y = digits_net_trainer()
    return model, x[:96], y[:96]


def _evaluate(digits, attacks=SUITE, **kw):
    model, x, y = digits
    return evaluate_robustness(model, (x, y), attacks=attacks, **{**SMALL, **kw})


@pytest.fixture(scope="module", params=[True, False], ids=["per_attack", "survivors"])
def result(digits, request):
    square = {"square": {"steps": 50}}
    return _evaluate(digits, (*SUITE, "square"), per_attack=request.param, attack_kwargs=square)


def _worst_row(result, tmp_path):
    """The worst-case accuracy as stored in the (Parquet) results table."""
    back = pq.read_table(write_results(result.to_table(), tmp_path / "results.parquet"))
    return back.filter(pc.equal(back.column("attack"), "worst_case")).column("accuracy")[0].as_py()


def test_recombined_worst_case_equals_the_stored_one_exactly(result, tmp_path):
    path = write_records(records_table([result]), tmp_path / "records.parquet")
    back = pq.read_table(path)
    assert back.schema.equals(RECORDS_SCHEMA, check_metadata=True)
    mask = worst_case_from_records(back)[result.model_name]
    assert torch.equal(mask, result.robust)
    assert int(mask.sum()) / len(mask) == _worst_row(result, tmp_path)  # ==, not approx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.parquet", "results.parquet"]


def test_one_row_per_image_and_attack(result):
    t = records_table([result])
    assert t.num_rows == result.n * (1 + len(result.attacks))
    rows = t.to_pylist()
    assert {(r["image"], r["attack"]) for r in rows} == {
        (i, a) for i in range(result.n) for a in ("clean", *result.attacks)
    }
    clean = [r["robust"] for r in rows if r["attack"] == "clean"]
    assert sum(clean) / result.n == result.clean_accuracy
    for a, acc in result.robust_accuracy.items():  # per_attack mode: each attack alone
        assert sum(bool(r["robust"]) for r in rows if r["attack"] == a) / result.n == acc
    mode = "per_attack" if result.per_attack else "survivors"
    assert {r["mode"] for r in rows} == {mode}
    assert {r["data_sha256"] for r in rows} == {result.data_sha256}
    not_run = [r for r in rows if r["attack"] != "clean" and r["robust"] is None]
    assert not_run  # misclassified images (and, in survivors mode, images already fooled)


def test_every_setting_is_recorded(result):
    rows = {r["attack"]: r for r in records_table([result]).to_pylist() if r["image"] == 0}
    assert rows["clean"]["eps"] == 0.0 and rows["clean"]["norm"] == "none"
    assert (rows["pgd"]["random_start"], rows["mim"]["random_start"]) == (True, False)
    assert rows["mim"]["decay"] == 1.0 and rows["pgd"]["decay"] is None
    assert rows["cw"]["kappa"] == math.inf
    assert rows["square"]["queries"] == 50 and rows["pgd"]["queries"] is None
    assert rows["fgsm"]["steps"] == 1 and rows["pgd"]["steps"] == 5
    assert rows["pgd"]["implementation"] == "rarn" and rows["pgd"]["impl_version"]
    settings = json.loads(rows["square"]["settings"])
    assert settings == {
        "eps": 0.1,
        "p_init": 0.8,
        "rescale": False,
        "step_size": 0.025,
        "steps": 50,
    }
    assert json.loads(rows["cw"]["settings"])["kappa"] == math.inf  # JSON's Infinity
    assert {r["eval_seed"] for r in rows.values()} == {0}
    seeds = [r["seed"] for a, r in rows.items() if a != "clean"]
    assert len(set(seeds)) == len(seeds)  # one generator per attack


def test_autoattack_settings_are_recorded(digits):
    pytest.importorskip("pyautoattack")
    model, x, y = digits
    r = evaluate_robustness(
        model,
        (x[:8], y[:8]),
        attacks=("autoattack",),
        attack_kwargs={"autoattack": {"n_iter": 2, "n_queries": 5}},
        **SMALL,
    )
    row = next(r for r in records_table([r]).to_pylist() if r["attack"] == "autoattack")
    assert (row["attack_version"], row["queries"], row["steps"]) == ("standard", 5, 2)
    assert row["implementation"] == "pyautoattack" and row["impl_version"] == "0.2.0"
    rows = [r for r in records_table([r]).to_pylist() if r["attack"] == "autoattack"]
    broken = [row for row in rows if row["robust"] is False]
    assert broken and all(
        row["component"] in ("apgd-ce", "apgd-t", "fab-t", "square") for row in broken
    )
    assert all(row["component"] is None for row in rows if row["robust"] is not False)


def test_an_attack_added_later_recombines_without_rerunning(digits):
    """FGSM+PGD, then MIM alone on the same data: the union is the three-attack worst case."""
    full = _evaluate(digits, ("fgsm", "pgd", "mim"))
    first = _evaluate(digits, ("fgsm", "pgd"))
    later = _evaluate(digits, ("mim",), model_name="model")
    both = pa.concat_tables([records_table([first]), records_table([later])])
    assert torch.equal(worst_case_from_records(both)["model"], full.robust)
    only_first = worst_case_from_records(both, attacks=("fgsm", "pgd"))["model"]
    assert torch.equal(only_first, first.robust)


def test_survivors_mode_refuses_an_undetermined_subset(digits):
    r = _evaluate(digits, ("fgsm", "pgd"), per_attack=False)
    t = records_table([r])
    assert torch.equal(worst_case_from_records(t)["model"], r.robust)
    with pytest.raises(ValueError, match="rerun with per_attack"):
        worst_case_from_records(t, attacks=("pgd",))  # FGSM fooled some images PGD never saw
    with pytest.raises(KeyError, match="mim"):
        worst_case_from_records(t, attacks=("mim",))


def test_data_sha256_identifies_the_evaluated_data(digits):
    model, x, y = digits
    r = _evaluate(digits, ("fgsm",))
    assert r.data_sha256 == data_sha256(x, y)
    h = DataHasher()
    for i in range(0, len(y), 7):  # any batching
        h.update(x[i : i + 7], y[i : i + 7])
    assert h.hexdigest() == r.data_sha256
    rgb = x.repeat(1, 3, 1, 1)
    assert data_sha256(rgb.to(memory_format=torch.channels_last), y) == data_sha256(rgb, y)
    assert data_sha256(x, (y + 1) % 10) != r.data_sha256
    assert data_sha256(x[:-1], y[:-1]) != r.data_sha256
    assert data_sha256(x.double(), y) != r.data_sha256


def test_rows_of_different_data_do_not_mix(digits):
    a = _evaluate(digits, ("fgsm",))
    model, x, y = digits
    b = evaluate_robustness(model, (x[:50], y[:50]), attacks=("pgd",), **SMALL)
    with pytest.raises(ValueError, match="different data"):
        worst_case_from_records(pa.concat_tables([records_table([a]), records_table([b])]))


def test_nothing_written_for_bad_records(result, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_records(RECORDS_SCHEMA.empty_table(), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="RECORDS_SCHEMA"):
        write_records(result.to_table(), tmp_path / "b.parquet")
    assert list(tmp_path.iterdir()) == []
    hand_made = type(result)(
        model_name="m",
        n=1,
        clean_accuracy=1.0,
        robust_accuracy={},
        worst_case_accuracy=1.0,
        robust=torch.ones(1, dtype=torch.bool),
        attacks=("pgd",),
        params={"pgd": {"eps": 0.1, "step_size": 0.1, "steps": 1}},
        main_attack="pgd",
    )
    with pytest.raises(ValueError, match="no per-image records"):
        records_table([hand_made])
