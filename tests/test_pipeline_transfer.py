"""The transfer matrix as a pipeline artifact (``evaluation.transfer``), on the shared Ray instance.

Two small networks, trained here for a few seconds and logged to MLflow as a retraining would,
stand for two evaluated models; ``Pipeline.evaluate`` (nothing left to evaluate) then makes their
transfer matrix. Checked: a failure (a model whose files differ from their digest) is recorded
and the evaluations are kept; the table on disk and on the parent run has one row per source x
target and equals the attack replayed here (the diagonal is white-box PGD); ``--resume`` does
not make it again; an older ``state.json`` without the field still loads; the config keys.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline.model_store import log_model_checked
from pipeline.stages import Pipeline
from pipeline.state import EvalOutcome, RetrainOutcome, RunState
from pipeline.tracking import download_checked, prepare_tracking
from pipeline.transfer import transfer_attack
from rarn.checkpoint import file_sha256
from rarn.config import ConfigError, load_config
from rarn.data import as_tensors, load_dataset
from rarn.models.darts import build_network
from rarn.robust.attacks import pgd
from rarn.space.genotype import get_genotype

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/smoke.yaml"
N = 16  # images of the matrix


def _trained(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
    """A 3-cell RACL network after 60 Adam steps on the digits (~95 % test accuracy)."""
    torch.manual_seed(seed)
    net = build_network(get_genotype("RACL"), num_classes=10, in_channels=1, C=8, layers=3)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory whose state holds two retrained, evaluated, logged models."""
    root = tmp_path_factory.mktemp("transfer")
    run_dir = root / "run"
    overrides = [f"run_dir={run_dir}", "evaluation.transfer=true", f"evaluation.transfer_n={N}"]
    cfg = load_config(SMOKE, overrides)
    bundle = load_dataset(cfg.data)
    tracking = prepare_tracking(cfg, uri=f"sqlite:///{root}/mlflow.db", run_dir=run_dir,
                                fingerprint=bundle.fingerprint)  # fmt: skip
    x, y = as_tensors(bundle.train)
    state = RunState(tracking.uri, tracking.experiment_id, tracking.parent_run_id)
    nets = {}
    for seed, key in enumerate(("t00", "t01")):
        nets[key] = _trained(x, y, seed)
        child = tracking.child_run("retrain", key)
        uri, sha = log_model_checked(tracking, child.run_id, nets[key], x[:2])
        child.end()
        g = nets[key].genotype.sha256()
        state.retrain[key] = RetrainOutcome(key, g, "", child.run_id, uri, sha)
        state.evaluate[key] = EvalOutcome(key, {"eval_worst_case_acc": 0.5}, {}, "r.parquet")
    run_dir.mkdir()
    state.save(run_dir)
    return {"cfg": cfg, "bundle": bundle, "tracking": tracking, "run_dir": run_dir, "nets": nets}


def _pipeline(run: dict, lines: list[str], resume: bool = False) -> Pipeline:
    state = RunState.load(run["run_dir"])
    return Pipeline(run["cfg"], run["run_dir"], state, run["tracking"], resume, lines.append, 0,
                    bundle=run["bundle"])  # fmt: skip


def _replayed(run: dict) -> dict[tuple[str, str], float]:
    """The matrix computed here: PGD of each source in order, from one seeded generator."""
    ev = run["cfg"].evaluation
    x, y = as_tensors(run["bundle"].test)
    x, y = x[:N], y[:N]
    g = torch.Generator().manual_seed(ev.seed)
    out = {}
    for s, src in run["nets"].items():
        x_adv = pgd(src, x, y, generator=g, **transfer_attack(ev))
        for t, tgt in run["nets"].items():
            with torch.no_grad():
                out[s, t] = int((tgt(x_adv).argmax(1) == y).sum()) / N
    return out


@pytest.mark.slow
def test_transfer_matrix_artifact_failure_and_resume(ray_local, run, tmp_path):
    run_dir, tracking = run["run_dir"], run["tracking"]
    table_path = run_dir / "evaluation" / "transfer.parquet"
    state = RunState.load(run_dir)
    good = state.retrain["t01"].model_sha256
    # 1. A model whose files differ from the digest the tracking store recorded: the error is
    # recorded, nothing raised, the evaluations stay, and no file is written.
    run_id = state.retrain["t01"].retrain_run_id
    tracking.client().set_tag(run_id, "rarn.model_sha256", "0" * 64)
    lines: list[str] = []
    _pipeline(run, lines).evaluate()
    saved = RunState.load(run_dir)
    assert saved.transfer is not None and "ArtifactIntegrityError" in saved.transfer.error
    assert not saved.transfer_done(["t00", "t01"]) and not table_path.exists()
    assert sorted(saved.evaluate) == ["t00", "t01"] and saved.evaluate_done("t00")
    assert any(ln.startswith("[transfer] error: ArtifactIntegrityError") for ln in lines), lines
    tracking.client().set_tag(run_id, "rarn.model_sha256", good)

    # 2. Made: on disk and on the parent run, one row per source x target, as replayed here.
    lines = []
    _pipeline(run, lines).evaluate()
    assert "[transfer] 2 x 2 models: PGD-2 at eps 0.1 on 16 test images" in lines, lines
    assert (run_dir / "evaluation" / "transfer.png").stat().st_size > 0
    rows = pq.read_table(table_path).to_pylist()
    assert sorted((r["source"], r["target"]) for r in rows) == sorted(
        itertools.product(["t00", "t01"], repeat=2)
    )
    assert {(r["attack"], r["n"], r["steps"], r["eps"]) for r in rows} == {("pgd", N, 2, 0.1)}
    matrix = {(r["source"], r["target"]): r["accuracy"] for r in rows}
    replayed = _replayed(run)
    assert matrix == replayed  # the diagonal: each model's own white-box PGD accuracy
    assert 0 < replayed["t00", "t00"] < 1 and replayed["t00", "t00"] < replayed["t00", "t01"]
    client = tracking.client()
    parent = tracking.parent_run_id
    logged = {a.path for a in client.list_artifacts(parent, "transfer")}
    assert logged == {"transfer/transfer.parquet", "transfer/transfer.png"}
    tags = client.get_run(parent).data.tags
    assert tags["rarn.sha256.transfer/transfer.png"] == file_sha256(table_path.with_suffix(".png"))
    downloaded = download_checked(tracking, parent, "transfer/transfer.parquet", tmp_path)
    assert pq.read_table(downloaded).equals(pq.read_table(table_path))
    saved = RunState.load(run_dir)
    assert saved.transfer_done(["t00", "t01"]) and saved.transfer.path == str(table_path)

    # 3. --resume: finished earlier, not made again.
    lines = []
    mtime = table_path.stat().st_mtime_ns
    _pipeline(run, lines, resume=True).evaluate()
    assert lines == [f"[transfer] finished earlier: {table_path}"], lines
    assert table_path.stat().st_mtime_ns == mtime
    assert len(client.list_artifacts(parent, "transfer")) == 2


def test_no_transfer_when_off_or_with_one_model(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the transfer stage ran")

    monkeypatch.setattr("pipeline.transfer.run_transfer_stage", refuse)
    off = load_config(SMOKE, [f"run_dir={tmp_path}"])
    on = load_config(SMOKE, [f"run_dir={tmp_path}", "evaluation.transfer=true"])
    for cfg, keys in ((off, ["t00", "t01"]), (on, ["t00"])):
        lines: list[str] = []
        state = RunState(
            retrain={k: RetrainOutcome(k, "g", "", "r", f"models:/{k}", "s") for k in keys},
            evaluate={k: EvalOutcome(k, {"eval_worst_case_acc": 0.5}) for k in keys},
        )
        Pipeline(cfg, tmp_path, state, None, False, lines.append, 0).evaluate()
        assert lines == [] and state.transfer is None


def test_state_without_transfer_loads_and_round_trips(tmp_path):
    state = RunState(tracking_uri="sqlite:///x.db")
    d = state.to_dict()
    assert d["transfer"] == {}
    del d["transfer"]  # a state.json of an earlier version
    assert RunState.from_dict(d).transfer is None
    from pipeline.state import TransferOutcome

    state.transfer = TransferOutcome(["a", "b"], "/r/evaluation/transfer.parquet", "/r/t.png")
    state.save(tmp_path)
    back = RunState.load(tmp_path)
    assert back.transfer == state.transfer and back.transfer_done(["a", "b"])
    assert not back.transfer_done(["a", "b", "c"])  # a model evaluated since: made again


@pytest.mark.parametrize(
    "override, needle",
    [
        ("evaluation.transfer=maybe", "evaluation.transfer: expected bool"),
        ("evaluation.transfer_n=-1", "evaluation.transfer_n: -1 not allowed"),
        ("evaluation.transfer_n=2.5", "evaluation.transfer_n: expected int"),
    ],
)
def test_transfer_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(SMOKE, [override])


def test_shipped_configs_turn_it_on_only_for_cifar10():
    on = {p.stem: load_config(p).evaluation.transfer for p in (ROOT / "configs").glob("*.yaml")}
    assert on["cifar10"] is True
    assert on["default"] is False and on["smoke"] is False
