"""Study mode (issue 12 item 6) and the robustness-aware selection metric (item 8).

The library side (variants, random genotypes, the study tables, ``val_pgd_acc``) runs in
seconds; one slow test runs a two-variant study through the whole pipeline on the smoke config.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.trials import overrides_of, trial_points
from rarn.config import ConfigError, DataConfig, SearchConfig, config_from_dict, load_config
from rarn.config.variants import VARIANTS, random_seed_of
from rarn.data import load_dataset
from rarn.models.baselines import BASELINES, baseline_sha256
from rarn.models.darts import build_network
from rarn.nas.loop import SearchData, faithful_log_bound, run_search, supernet_pgd_accuracy
from rarn.nas.search import RACLSearch
from rarn.space.genotype import GENOTYPES, Genotype, random_genotype
from rarn.study import (
    RUN_SCHEMA,
    csv_row,
    data_digests,
    mask_from_hex,
    mask_to_hex,
    read_runs_csv,
    run_row,
    runs_table,
    summarise,
    to_markdown,
    write_runs_csv,
)

ROOT = Path(__file__).resolve().parents[1]
# val_pgd_acc and the final selection on 16 images, first order: plumbing, in seconds
TINY = SearchConfig(epochs=3, warmup_epochs=1, batch_size=16, init_channels=8, layers=3, nodes=2,
                    max_steps_per_epoch=2, robust_eval_n=16, robust_eval_steps=2,
                    robust_eval_eps=0.1, decode_n=16, decode_estimate="first_order")  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return SearchData.from_bundle(load_dataset(DataConfig(name="digits", limit=200)), 0.5, 0)


# -- config ------------------------------------------------------------------------------------


def test_study_trials_are_variants_times_seeds_with_stable_keys():
    cfg = config_from_dict({"study": {"variants": ["racl", "pcdarts_plain"], "seeds": [3, 4]}})
    points = trial_points(cfg)
    assert [p["key"] for p in points] == [
        "racl-s3",
        "racl-s4",
        "pcdarts_plain-s3",
        "pcdarts_plain-s4",
    ]
    plain = overrides_of(points[2])
    assert plain == {**VARIANTS["pcdarts_plain"], "search.seed": 3}  # no key, no variant name
    assert points[2]["variant"] == "pcdarts_plain"


def test_own_variants_are_defined_in_the_config():
    cfg = config_from_dict(
        {
            "study": {
                "variants": ["mine"],
                "seeds": [0],
                "define": {"mine": {"constraint.eta": 0.95}},
            }
        }
    )
    assert overrides_of(trial_points(cfg)[0]) == {"constraint.eta": 0.95, "search.seed": 0}


@pytest.mark.parametrize(
    "study, names",
    [
        ({"variants": ["nope"]}, "study.variants[0]"),
        ({"variants": ["Bad-Name"]}, "study.variants[0]"),
        ({"variants": ["racl", "racl"]}, "study.variants"),
        ({"variants": ["racl"], "seeds": []}, "study.seeds"),
        ({"variants": ["x"], "define": {"x": {"retrain.epochs": 1}}}, "study.define.x"),
        ({"variants": ["x"], "define": {"x": {"search.epochs": 0}}}, "search.epochs"),
    ],
)
def test_bad_study_is_a_config_error_naming_the_key(study, names):
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"study": study})


def test_study_and_param_space_do_not_mix():
    with pytest.raises(ConfigError, match="tune.param_space"):
        config_from_dict(
            {"study": {"variants": ["racl"]}, "tune": {"param_space": {"search.lr": [0.1]}}}
        )


def test_selection_by_val_pgd_acc_needs_the_robust_evaluation():
    assert config_from_dict({}).tune.select_metric == "val_pgd_acc"
    with pytest.raises(ConfigError, match="robust_eval_every"):
        config_from_dict({"search": {"robust_eval_every": 0}})
    config_from_dict({"search": {"robust_eval_every": 0}, "tune": {"select_metric": "val_acc"}})


def test_baselines_are_checked_at_load():
    cfg = config_from_dict({"retrain": {"baselines": ["RACL", "random-7"]}})
    assert cfg.retrain.baselines == ("RACL", "random-7")
    for bad in (["nope"], ["RACL", "RACL"], ["random-x"]):
        with pytest.raises(ConfigError, match="retrain.baselines"):
            config_from_dict({"retrain": {"baselines": bad}})


def test_named_networks_are_baselines_too():
    cfg = config_from_dict({"retrain": {"baselines": ["RACL", "resnet18", "wrn-16-4"]}})
    assert cfg.retrain.baselines == ("RACL", "resnet18", "wrn-16-4")
    assert config_from_dict({"retrain": {"genotype": "resnet18"}}).retrain.genotype == "resnet18"
    with pytest.raises(ConfigError, match="retrain.baselines") as info:
        config_from_dict({"retrain": {"baselines": ["resnet19"]}})
    assert all(name in str(info.value) for name in [*BASELINES, *GENOTYPES, "random-<seed>"])
    with pytest.raises(ConfigError, match="repeats a name"):
        config_from_dict({"retrain": {"baselines": ["resnet18", "resnet18"]}})


def test_a_named_baseline_is_a_job_without_a_genotype(tmp_path):
    from pipeline.retrain import RetrainJob
    from pipeline.stages import Pipeline
    from pipeline.state import RunState

    cfg = config_from_dict(
        {"retrain": {"genotype": "RACL", "baselines": ["DARTS_V2", "resnet18"], "drop_path": 0.2,
                     "auxiliary_weight": 0.4, "batch_size": 32}}
    )  # fmt: skip
    pipe = Pipeline(cfg, tmp_path, RunState(), None, False, lambda _: None, 0)
    assert pipe.baselines() == {"ref-DARTS_V2": GENOTYPES["DARTS_V2"], "ref-resnet18": "resnet18"}
    jobs = {j.key: j for j in pipe.retrain_jobs()}
    assert list(jobs) == ["RACL", "ref-DARTS_V2", "ref-resnet18"]
    job = jobs["ref-resnet18"]
    assert job.genotype is None and job.network == "resnet18"
    assert job.architecture_sha == baseline_sha256("resnet18") != GENOTYPES["RACL"].sha256()
    assert jobs["RACL"].architecture_sha == GENOTYPES["RACL"].sha256()
    worker = job.worker_config(2)  # the named network by name; DARTS-only settings off
    assert (worker.genotype, worker.batch_size) == ("resnet18", 16)
    assert (worker.drop_path, worker.auxiliary_weight) == (0.0, 0.0)
    assert not (tmp_path / "retrain" / "ref-resnet18").exists()  # no genotype.json written
    darts = jobs["ref-DARTS_V2"].worker_config(1)
    assert Path(darts.genotype).name == "genotype.json" and darts.drop_path == 0.2
    for bad in ({"genotype": None}, {"genotype": GENOTYPES["RACL"], "network": "resnet18"}):
        with pytest.raises(ValueError, match="a genotype or a network"):
            RetrainJob("x", cfg=cfg.retrain, tracking=None, run_dir=str(tmp_path), **bad)
    named = config_from_dict({"retrain": {"genotype": "resnet18"}})
    (only,) = Pipeline(named, tmp_path, RunState(), None, False, print, 0).retrain_jobs()
    assert (only.key, only.network) == ("resnet18", "resnet18")


def test_shipped_study_configs_load():
    for name in ("study_cifar10_subset", "study_cifar10"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        # issue 16: the default, without the constraint, plain PC-DARTS and random, 5+ seeds
        assert {"racl", "constraint_off", "pcdarts_plain"} <= set(cfg.study.variants)
        assert len(cfg.study.seeds) >= 5 and cfg.study.random_baseline
        assert len(trial_points(cfg)) == len(cfg.study.variants) * len(cfg.study.seeds)


# -- random genotypes --------------------------------------------------------------------------


def test_random_genotype_is_seeded_valid_and_never_none():
    g = random_genotype(5)
    assert g == random_genotype(5) and g != random_genotype(6)
    for cell in (g.normal, g.reduce):
        assert all(op != "none" for op, _ in cell)
        for node in range(4):
            a, b = cell[2 * node][1], cell[2 * node + 1][1]
            assert a != b and max(a, b) < node + 2  # two distinct earlier states
    net = build_network(g, num_classes=10, in_channels=1, C=8, layers=3)
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert random_seed_of("random-12") == 12 and random_seed_of("RACL") is None


def test_random_genotypes_cover_the_op_space():
    ops = {op for s in range(20) for cell in (random_genotype(s).normal,) for op, _ in cell}
    assert len(ops) == 7  # every op but none, over 20 draws (160 edges)


# -- the search's robustness metric ------------------------------------------------------------


def test_val_pgd_acc_is_reported_every_epoch_and_carried_between_measurements(data):
    cfg = dataclasses.replace(TINY, epochs=4, robust_eval_every=3)
    measured = []
    import rarn.nas.loop as loop

    real = loop.supernet_pgd_accuracy

    def spy(s, dataset):
        measured.append(s.epoch)
        return real(s, dataset)

    loop.supernet_pgd_accuracy = spy
    try:
        result = run_search(cfg, load_config(None).constraint, data)
    finally:
        loop.supernet_pgd_accuracy = real
    assert measured == [0, 2, 3]  # first, every 3rd, last
    accs = [h["val_pgd_acc"] for h in result.history]
    assert accs[1] == accs[0] and all(0 <= a <= 1 for a in accs)
    assert all(math.isfinite(h["log_lambda_faithful"]) for h in result.history)
    # measuring leaves the search as it was: every epoch's measurement gives the same run
    every = run_search(dataclasses.replace(cfg, robust_eval_every=1),
                       load_config(None).constraint, data)  # fmt: skip
    assert every.genotype == result.genotype
    assert [h["val_pgd_acc"] for h in every.history][::3] == accs[::3]
    for key in ("train_loss", "val_loss", "mu_F"):
        assert [h[key] for h in every.history] == [h[key] for h in result.history], key


def test_supernet_pgd_accuracy_falls_with_eps(digits_net_trainer):
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    net, x, y = digits_net_trainer()  # ~97 % clean: the attack has something to take away
    ds = TensorDataset(x[:128], y[:128])
    cfg = dataclasses.replace(TINY, robust_eval_n=100, robust_eval_eps=1e-4)
    s = SimpleNamespace(model=net, device=torch.device("cpu"), cfg=cfg)
    clean = float((net(x[:100]).argmax(1) == y[:100]).float().mean())
    tiny = supernet_pgd_accuracy(s, ds)
    s.cfg = dataclasses.replace(s.cfg, robust_eval_eps=0.1, robust_eval_steps=5)
    mid = supernet_pgd_accuracy(s, ds)
    s.cfg = dataclasses.replace(s.cfg, robust_eval_eps=0.5)
    large = supernet_pgd_accuracy(s, ds)
    assert tiny == pytest.approx(clean, abs=0.02) and clean > 0.9
    assert large < mid < tiny  # a check that could not fire would pass a constant
    assert large < 0.1


def test_faithful_bound_is_the_product_bound_whatever_the_variant():
    base = load_config(None)
    a = RACLSearch(TINY, base.constraint, num_classes=10, in_channels=1)
    parametric = dataclasses.replace(base.constraint, mixture="parametric", bound="node_mean")
    b = RACLSearch(TINY, parametric, num_classes=10, in_channels=1)
    assert faithful_log_bound(a) == pytest.approx(faithful_log_bound(b), rel=1e-6)
    mu_f, _ = a.moments(a.bound_inputs(1, update=False))
    assert faithful_log_bound(a) == pytest.approx(float(mu_f), rel=1e-6)
    assert float(b.moments(b.bound_inputs(1, update=False))[0]) != pytest.approx(float(mu_f))


# -- the tables --------------------------------------------------------------------------------


def _rows():
    rows = []
    for seed, wc in enumerate((0.20, 0.30, 0.25)):
        search = {"log_lambda_faithful": 100.0 + seed, "frac_satisfied": 0.25, "y": 0.1,
                  "collapsed": 0.0, "collapse_param_free_share_normal": 0.25,
                  "val_pgd_acc": 0.1, "val_acc": 0.4}  # fmt: skip
        ev = {"eval_clean_acc": 0.5, "eval_pgd_acc": wc + 0.05, "eval_worst_case_acc": wc}
        rows.append(run_row(variant="racl", seed=seed, key=f"racl-s{seed}",
                            genotype=GENOTYPES["RACL"], search=search, evaluation=ev))  # fmt: skip
    ev = {"eval_clean_acc": 0.4, "eval_pgd_acc": 0.2, "eval_worst_case_acc": 0.1}
    rows.append(run_row(variant="random", seed=0, key="ref-random-0", genotype=random_genotype(0),
                        search=None, evaluation=ev))  # fmt: skip
    return rows


def test_study_tables_have_mean_and_spread_per_variant():
    runs = runs_table(_rows())
    assert runs.schema.equals(RUN_SCHEMA) and runs.num_rows == 4
    summary = summarise(runs, order=["racl", "random"])
    by = {r["variant"]: r for r in summary.to_pylist()}
    assert by["racl"]["n"] == 3
    assert by["racl"]["worst_case_acc_mean"] == pytest.approx(0.25)
    assert by["racl"]["worst_case_acc_std"] == pytest.approx(0.05)
    assert by["racl"]["constraint_active_mean"] == pytest.approx(0.75)
    assert by["random"]["worst_case_acc_std"] == 0.0  # one run
    assert math.isnan(by["random"]["log_lambda_faithful_mean"])  # never searched
    assert by["racl"]["ops_sep_conv_3x3_mean"] == 7  # RACL: 4 normal + 3 reduce
    text = to_markdown(summary)
    assert "| racl | 3 | 0.250 ± 0.050 |" in text and "| random | 1 |" in text


def test_a_named_network_row_has_no_ops_and_no_collapse_signals():
    ev = {"eval_clean_acc": 0.6, "eval_pgd_acc": 0.3, "eval_worst_case_acc": 0.25}
    sha = baseline_sha256("resnet18")
    row = run_row(variant="ref:resnet18", seed=0, key="ref-resnet18", genotype=None, search=None,
                  evaluation=ev, genotype_sha=sha)  # fmt: skip
    assert row["genotype_sha"] == sha and row["worst_case_acc"] == 0.25
    assert all(row[f.name] == 0 for f in RUN_SCHEMA if f.name.startswith("ops_"))
    assert math.isnan(row["collapsed"]) and math.isnan(row["param_free_normal"])
    summary = summarise(runs_table([*_rows(), row]), order=["racl"])
    text = to_markdown(summary)
    assert "| ref:resnet18 | 1 | 0.250 ± 0.000 |" in text


def test_random_rows_carry_the_collapse_signals_of_their_genotype():
    row = _rows()[-1]
    g = random_genotype(0)
    free = sum(op in ("skip_connect", "max_pool_3x3", "avg_pool_3x3") for op, _ in g.normal)
    assert row["param_free_normal"] == free / 8


def test_masks_survive_hex():
    rng = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 9, 2000):
        m = (torch.rand(n, generator=rng) > 0.5).numpy()
        assert (mask_from_hex(mask_to_hex(m)) == m).all() and len(
            mask_from_hex(mask_to_hex(m))
        ) == n


def test_the_csv_holds_every_network_with_its_genotype_attacks_digests_and_mask(tmp_path):
    import numpy as np

    rows = []
    digests = {"data_sha256": "f" * 64, "search_data_sha256": "a" * 64,
               "retrain_data_sha256": "b" * 64, "eval_data_sha256": "c" * 64}  # fmt: skip
    for i, row in enumerate(_rows()):
        g = GENOTYPES["RACL"] if row["variant"] == "racl" else random_genotype(0)
        ev = {"eval_clean_acc": row["clean_acc"], "eval_fgsm_acc": 0.4, "eval_pgd_acc": 0.3,
              "eval_autoattack_acc": 0.2, "eval_worst_case_acc": row["worst_case_acc"],
              "eval_worst_case_n": 20.0, "eval_n": 40.0}  # fmt: skip
        mask = np.arange(40) % (i + 2) == 0
        rows.append(csv_row(row, genotype_json=g.to_json(), evaluation=ev, digests=digests,
                            mask=mask))  # fmt: skip
    path = write_runs_csv(rows, tmp_path / "runs.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:7] == ["variant", "seed", "key", "genotype_sha", "genotype", "n", "clean_acc"]
    assert header[7:10] == ["fgsm_acc", "pgd_acc", "autoattack_acc"]  # every attack
    assert header[-1] == "worst_case_mask" and "eval_data_sha256" in header
    back = read_runs_csv(path)
    assert [(r["variant"], r["seed"]) for r in back] == [("racl", 0), ("racl", 1), ("racl", 2),
                                                         ("random", 0)]  # fmt: skip
    first = back[0]
    assert Genotype.from_json(first["genotype"]) == GENOTYPES["RACL"]
    assert first["n"] == 40 and first["worst_case_acc"] == 0.2 and first["worst_case_n"] == 20
    assert first["search_data_sha256"] == "a" * 64 and first["test_data_sha256"] == ""
    assert (first["worst_case_mask"] == (np.arange(40) % 2 == 0)).all()
    assert math.isnan(back[-1]["log_lambda_faithful"])  # not searched: an empty cell
    assert first["log_lambda_faithful"] == 100.0


def test_data_digests_name_each_stages_images():
    from rarn.robust.evaluation import data_sha256

    b = load_dataset(DataConfig(limit=60, retrain_images="disjoint", retrain_limit=40,
                                test_limit=30))  # fmt: skip
    d = data_digests(b, batch_size=16)  # batch by batch: the digest of one big batch
    from rarn.data import as_tensors

    assert d["test_data_sha256"] == data_sha256(*as_tensors(b.test))
    assert d["retrain_data_sha256"] == data_sha256(*as_tensors(b.retrain))
    assert len({d["search_data_sha256"], d["retrain_data_sha256"], d["test_data_sha256"]}) == 3
    shared = data_digests(load_dataset(DataConfig(limit=60, test_limit=30)))
    assert shared["search_data_sha256"] == shared["retrain_data_sha256"] == d["search_data_sha256"]
    assert d["data_sha256"] == b.fingerprint


# -- the pipeline --------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_through_the_pipeline(ray_local, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [
        "--config", str(ROOT / "configs/smoke.yaml"), "--force-promote",
        "tune.param_space={}", "study.variants=[racl,pcdarts_plain]", "study.seeds=[0]",
        "retrain.baselines=[resnet18]", "evaluation.checks=false",
    ]  # fmt: skip
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    study = tmp_path / "runs/smoke/study"
    runs = pq.read_table(study / "runs.parquet")
    assert sorted(runs.column("variant").to_pylist()) == [
        "pcdarts_plain",
        "racl",
        "random",
        "ref:resnet18",
    ]
    assert all(v == v for v in runs.column("worst_case_acc").to_pylist())  # every model evaluated
    (resnet,) = [r for r in runs.to_pylist() if r["variant"] == "ref:resnet18"]
    assert math.isfinite(resnet["worst_case_acc"]) and 0 <= resnet["worst_case_acc"] <= 1
    assert resnet["genotype_sha"] == baseline_sha256("resnet18") and resnet["ops_skip_connect"] == 0
    assert math.isnan(resnet["collapsed"])
    summary = pq.read_table(study / "summary.parquet")
    assert summary.column("variant").to_pylist()[:3] == ["racl", "pcdarts_plain", "random"]
    assert "[study]" in out and "| racl | 1 |" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    mv = client.get_model_version_by_alias("rarn-smoke", "champion")
    assert not mv.tags["rarn.trial_key"].startswith("ref-")  # references are never registered
    parent = mv.tags["rarn.parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "study")}
    assert logged == {
        f"study/{f}"
        for f in ("runs.parquet", "runs.csv", "summary.parquet", "summary.md", "study.png")
    }
    csv_rows = read_runs_csv(study / "runs.csv")  # the auditable copy, one row per network
    assert sorted(r["variant"] for r in csv_rows) == sorted(runs.column("variant").to_pylist())
    for r in csv_rows:
        assert r["eval_data_sha256"] == r["test_data_sha256"] != r["search_data_sha256"]
        assert len(r["worst_case_mask"]) == r["n"] and r["genotype"].startswith("{")
        assert r["worst_case_mask"].mean() == pytest.approx(r["worst_case_acc"])
    assert client.get_run(parent).data.tags["rarn.select_metric"] == "val_pgd_acc (max)"
    trial = client.get_run(mv.tags["rarn.search_run_id"])
    assert trial.data.tags["rarn.variant"] in ("racl", "pcdarts_plain")
    assert "final_val_pgd_acc" in trial.data.metrics
    (ref,) = client.search_runs([trial.info.experiment_id],
                                "tags.`rarn.genotype_source` = 'ref-resnet18'")  # fmt: skip
    assert ref.data.tags["rarn.network"] == "resnet18"
    assert ref.data.tags["rarn.genotype_sha"] == baseline_sha256("resnet18")
    assert ref.data.metrics["final_params"] == 11_172_810  # ResNet-18, 1 channel in, 10 out
    assert "eval_worst_case_acc" in ref.data.metrics  # evaluated from the portable model
    assert not any(a.path == "genotype.json" for a in client.list_artifacts(ref.info.run_id))


def test_study_rows_leave_constraint_activity_empty_for_unconstrained_variants(tmp_path):
    from pipeline.state import EvalOutcome, RetrainOutcome, RunState, SearchState, TrialOutcome
    from pipeline.study import study_rows

    cfg = config_from_dict({"study": {"variants": ["racl", "constraint_off"], "seeds": [0]}})
    g = GENOTYPES["RACL"]
    monitored = {"frac_satisfied": 0.25, "y": 0.0, "log_lambda_faithful": 110.0}
    state = RunState()
    outcomes = []
    for point in trial_points(cfg):
        key = point["key"]
        outcomes.append(TrialOutcome(key, {k: v for k, v in point.items() if k != "key"},
                                     "TERMINATED", dict(monitored), True, genotype=g))  # fmt: skip
        state.retrain[key] = RetrainOutcome(key, g.sha256(), "", model_uri="m")
        state.evaluate[key] = EvalOutcome(key, {"eval_worst_case_acc": 0.2})
    state.search = SearchState([o.key for o in outcomes], outcomes)
    rows = {r["variant"]: r for r in study_rows(cfg, state, tmp_path)}
    assert rows["racl"]["constraint_active"] == 0.75 and rows["racl"]["dual"] == 0.0
    off = rows["constraint_off"]
    assert math.isnan(off["constraint_active"]) and math.isnan(off["dual"])
    assert off["log_lambda_faithful"] == 110.0  # the bound is measured for every variant
    from pipeline.study import csv_rows

    state.evaluate["racl-s0"].data_sha256 = "c" * 64
    audit = {r["variant"]: r for r in csv_rows(cfg, state, tmp_path)}  # no bundle, no records
    assert audit["racl"]["genotype"] == g.to_json() and audit["racl"]["worst_case_acc"] == 0.2
    assert audit["racl"]["eval_data_sha256"] == "c" * 64 and audit["racl"]["worst_case_mask"] == ""
    assert audit["constraint_off"]["search_data_sha256"] == ""
