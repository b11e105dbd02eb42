"""The model registry: the promotion rule, the portable model, the registry CLI's failures.

No Ray: models are logged in this process to an sqlite store under ``tmp_path``. The fresh
virtual environment test (torch and mlflow at this environment's versions, no rarn) is slow:
it installs them with pip from the machine's package configuration (set ``RARN_TEST_VENV`` to
a folder to keep and reuse the environment).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import registry
from pipeline.model_store import load_model_checked, log_model_checked
from pipeline.promotion import Decision, decide
from pipeline.report import summary
from pipeline.stages import Pipeline
from pipeline.state import EvalOutcome, RetrainOutcome, RunState
from pipeline.tracking import ArtifactIntegrityError, ChildRun, prepare_tracking
from rarn.config import load_config
from rarn.models.darts import build_network
from rarn.space.genotype import get_genotype

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
NAME = "rarn-reg"
DATA_A, DATA_B, PROTOCOL = "a" * 64, "b" * 64, "p" * 64


def _mask(worst: float, n: int = 200) -> torch.Tensor:
    """A per-image headline of ``n`` images: the first ``worst * n`` robust (nested masks)."""
    return torch.arange(n) < round(worst * n)


def _ev(worst: float, data: str = DATA_A, flags: dict | None = None, error: str | None = None,
        root: Path | None = None):  # fmt: skip
    """An evaluation outcome; with ``root``, its per-image headline (``_mask``) packed, and its
    records beside it."""
    metrics = {} if error else {"eval_worst_case_acc": worst, "eval_clean_acc": 0.9}
    flags = flags or {"zero_gradients": False, "black_box_stronger": None}
    path, robust = "", ""
    if root is not None:
        from rarn.robust.evaluation import (
            RobustnessResult,
            pack_mask,
            records_table,
            write_records,
        )

        m, ones = _mask(worst), torch.ones(200, dtype=torch.bool)
        r = RobustnessResult("t00", 200, 1.0, {}, worst, m, ("pgd",),
                             {"pgd": {"eps": 0.1, "step_size": 0.1, "steps": 1}}, "pgd",
                             correct=ones, attacked={"pgd": ones}, survived={"pgd": m},
                             data_sha256=data)  # fmt: skip
        d = root / f"ev-{worst}"
        d.mkdir(exist_ok=True)
        write_records(records_table([r]), d / "records.parquet")
        path, robust = str(d / "results.parquet"), pack_mask(m)
    return EvalOutcome("t00", metrics, flags, path, error=error, data_sha256=data,
                       protocol=PROTOCOL, robust_mask=robust)  # fmt: skip


def test_promotion_rule():
    from rarn.robust.evaluation import pack_mask

    champ = ("3", {"rarn.eval_worst_case_acc": "0.3", "rarn.eval_data_sha256": DATA_A,
                   "rarn.eval_protocol": PROTOCOL,
                   "rarn.eval_robust": pack_mask(_mask(0.3))})  # fmt: skip
    assert decide(None, None) == Decision(False, "not evaluated")
    assert not decide(_ev(0, error="RuntimeError: x"), None, force=True).promote  # never forced
    flagged = decide(_ev(0.9, flags={"zero_gradients": True}), None)
    assert not flagged.promote and "zero_gradients" in flagged.reason
    assert decide(_ev(0.1), None).promote  # no champion yet
    better = decide(_ev(0.4), champ, mask=pack_mask(_mask(0.4)))  # 20 images only it survives
    assert better.promote and "beats champion version 3" in better.reason, better.reason
    noise = decide(_ev(0.31), champ, mask=pack_mask(_mask(0.31)))  # 2 images: inside the noise
    assert not noise.promote and "beyond the noise" in noise.reason and "p = 0.25" in noise.reason
    assert not decide(_ev(0.3), champ, mask=pack_mask(_mask(0.3))).promote  # a tie does not beat
    unpaired = decide(_ev(0.9), champ)  # no per-image evidence: nothing to pair
    assert not unpaired.promote and "no per-image headline" in unpaired.reason
    other = decide(_ev(0.9, data=DATA_B), champ)
    assert not other.promote and "other data" in other.reason
    protocol = decide(dataclasses.replace(_ev(0.9), protocol="q" * 64), champ)
    assert not protocol.promote and "evaluation settings" in protocol.reason
    forced = decide(_ev(0.1, flags={"zero_gradients": True}), champ, force=True)
    assert forced.promote and forced.forced and "--force-promote" in forced.reason


# ----------------------------------------------------------------------------------------------
# A logged model in an sqlite store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An sqlite tracking store with one logged (portable) model; yields its handles."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(SMOKE, [f"run_dir={root}/run", f"tracking.registered_model={NAME}"])
    tracking = prepare_tracking(cfg, uri=uri, run_dir=root / "run", fingerprint="f" * 64)
    run = tracking.child_run("retrain", "t00")
    torch.manual_seed(0)
    net = build_network(get_genotype("RACL"), num_classes=10, in_channels=1, C=8, layers=5).eval()
    x = torch.rand(4, 1, 8, 8)
    model_uri, sha = log_model_checked(tracking, run.run_id, net, x[:2])
    run.end()
    retrained = RetrainOutcome("t00", net.genotype.sha256(), "", run.run_id, model_uri, sha)
    return {"root": root, "uri": uri, "cfg": cfg, "tracking": tracking, "net": net, "x": x,
            "retrained": retrained}  # fmt: skip


def _record(store, ev: EvalOutcome) -> None:
    """Log ``ev`` to the retraining run as the evaluation stage does: the promotion rule reads
    the evidence from there (pipeline.evidence), not from state.json."""
    client, run_id = store["tracking"].client(), store["retrained"].retrain_run_id
    for key in client.get_run(run_id).data.tags:
        if key.startswith("rarn.masking."):
            client.delete_tag(run_id, key)
    if ev.error:
        return
    run = ChildRun(store["tracking"], run_id)
    run.log_metrics(ev.metrics, step=0)
    digests = {"rarn.eval_data_sha256": ev.data_sha256, "rarn.eval_protocol": ev.protocol}
    if ev.robust_mask:  # the per-image headline the promotion rule pairs (rarn.eval_robust)
        digests["rarn.eval_robust"] = ev.robust_mask
    run.set_tags({f"rarn.masking.{k}": v for k, v in ev.flags.items()} | digests)


def _register(store, ev: EvalOutcome | None, force: bool = False, state: RunState | None = None):
    """One pipeline run's registration of the stored model with evaluation ``ev``."""
    if state is None:
        state = RunState(retrain={"t00": store["retrained"]})
    if ev is not None:
        state.evaluate["t00"] = ev
        _record(store, ev)
    run_dir = store["root"] / "run"
    pipe = Pipeline(store["cfg"], run_dir, state, store["tracking"], False, lambda _: None, 0,
                    force_promote=force)  # fmt: skip
    pipe.register()
    return state


def _alias(store) -> str | None:
    version = store["tracking"].client().get_registered_model(NAME).aliases.get("champion")
    return None if version is None else str(version)


def test_registry_promotes_only_what_earned_it(store):
    client = store["tracking"].client()
    # 1. Retrained, never evaluated (--stages retrain): a version, no alias, the summary says why.
    state = _register(store, None)
    reg = state.registered
    assert (reg.version, reg.promoted, reg.reason) == ("1", False, "not evaluated")
    assert reg.uri == f"models:/{NAME}/1" and _alias(store) is None
    text = summary(state, experiment="x", tracking_uri=store["uri"], parent_run_id="p",
                   run_dir=Path("/r"))  # fmt: skip
    assert f"models:/{NAME}/1 (version 1, trial t00, not champion: not evaluated)" in text
    # ... resumed once its evaluation finished: the same version is promoted (no champion yet).
    _register(store, _ev(0.2, root=store["root"]), state=state)
    assert state.registered.promoted and _alias(store) == "1"
    assert state.registered.uri == f"models:/{NAME}@champion"
    tags = client.get_model_version(NAME, "1").tags
    assert tags["rarn.eval_data_sha256"] == DATA_A and tags["rarn.promotion"].startswith("promoted")
    # 2. A masking flag: registered, not promoted.
    state = _register(store, _ev(0.9, flags={"black_box_stronger": True}))
    assert not state.registered.promoted and _alias(store) == "1"
    assert "black_box_stronger" in client.get_model_version(NAME, "2").tags["rarn.promotion"]
    # 3. Worse, or better on other data: not promoted. Better on the same data: promoted.
    assert not _register(store, _ev(0.1, root=store["root"])).registered.promoted
    assert "other data" in _register(store, _ev(0.9, data=DATA_B)).registered.reason
    better = _register(store, _ev(0.25, root=store["root"])).registered
    assert better.promoted and _alias(store) == better.version
    assert better.reason.startswith(
        "beats champion version 1: worst-case robust accuracy 0.2500 vs 0.2000; paired on 200"
    ), better.reason
    # 4. --force-promote: promoted anyway, and logged on the version and the pipeline run.
    forced = _register(store, _ev(0.01), force=True).registered
    assert forced.promoted and _alias(store) == forced.version
    assert client.get_model_version(NAME, forced.version).tags["rarn.force_promote"] == "true"
    parent = client.get_run(store["tracking"].parent_run_id).data.tags
    assert parent["rarn.force_promote"] == "true"
    assert parent["rarn.champion"] == f"{NAME}/{forced.version}"
    # 5. A failed evaluation is never promoted, not even by force.
    state = _register(store, _ev(0, error="RuntimeError: eps"), force=True)
    assert not state.registered.promoted and _alias(store) == forced.version


def test_portable_model_loads_checked_and_without_pickle(store, monkeypatch, tmp_path):
    tracking, retrained, net, x = store["tracking"], store["retrained"], store["net"], store["x"]
    model = load_model_checked(tracking, retrained.model_uri, retrained.model_sha256)
    assert type(model) is type(net) and torch.allclose(model(x), net(x), atol=1e-6)
    # The model directory: a state_dict, the genotype, the build arguments; no pickle of code.
    location = tracking.client().get_logged_model(retrained.model_uri[len("models:/") :])
    art = Path(location.artifact_location.removeprefix("file://"))
    names = {p.name for p in (art / "artifacts").iterdir()}
    assert names == {"weights.pt", "genotype.json", "network.json"}
    assert not list(art.rglob("*.pkl")) and (art / "code" / "rarn" / "__init__.py").is_file()
    state = torch.load(art / "artifacts" / "weights.pt", weights_only=True)
    assert set(state) == set(net.state_dict())
    # Tampered weights: refused before anything is loaded.
    weights = art / "artifacts" / "weights.pt"
    original = weights.read_bytes()
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
            load_model_checked(tracking, retrained.model_uri, retrained.model_sha256)
        assert loads == []
    finally:
        weights.write_bytes(original)
    monkeypatch.undo()
    # Plain MLflow, pickle deserialization disallowed, from another folder: predict works, and
    # the rarn it imports is the copy inside the model.
    _register(store, _ev(0.99), force=True)
    np.save(tmp_path / "x.npy", x.numpy())
    out = _plain_mlflow(sys.executable, store["uri"], tmp_path)
    assert "/code/rarn/__init__.py" in out.stdout, out.stdout + out.stderr
    got = np.load(tmp_path / "y.npy")
    assert np.allclose(got, net(x).detach().numpy(), atol=1e-5)


_PREDICT = f"""
import sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
print(model.metadata.signature.inputs.to_dict())
np.save("y.npy", model.predict(np.load("x.npy")))
print(sys.modules["rarn"].__file__)
"""


def _plain_mlflow(python: str, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    out = subprocess.run([python, "-c", _PREDICT], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _fresh_venv(path: Path) -> Path:
    """A virtual environment that has never seen rarn, with this environment's packages (torch,
    numpy, mlflow, pyarrow, at the same versions) on its path as one plain entry of a ``.pth``
    file. A directory named that way is not a site directory: the ``.pth`` files inside it, rarn's
    editable-install hook among them, are not processed, so ``import rarn`` fails there (the
    test probes it). Installing the four by pip instead took about 3 of CI's 30 minutes."""
    python = path / "bin" / "python"
    if python.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = subprocess.run([str(python), "-c", ask], capture_output=True, text=True, check=True)
    Path(target.stdout.strip(), "parent_env.pth").write_text(sysconfig.get_paths()["purelib"])
    return python


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_champion_loads_in_a_fresh_virtualenv_without_this_repository(store, tmp_path):
    keep = os.environ.get("RARN_TEST_VENV")
    python = _fresh_venv(Path(keep) if keep else tmp_path / "venv")
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        probe = subprocess.run([str(python), "-c", "import rarn"], cwd=tmp_path, env=env,
                               capture_output=True, text=True)  # fmt: skip
        assert probe.returncode != 0 and "No module named 'rarn'" in probe.stderr
        _register(store, _ev(0.999), force=True)
        x, net = store["x"], store["net"]
        np.save(tmp_path / "x.npy", x.numpy())
        out = _plain_mlflow(str(python), store["uri"], tmp_path)
        assert "/code/rarn/__init__.py" in out.stdout
        assert np.allclose(np.load(tmp_path / "y.npy"), net(x).detach().numpy(), atol=1e-5)
    finally:
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp_path / "venv")], check=False)


# ----------------------------------------------------------------------------------------------
# The registry CLI fails fast and creates nothing


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_cli_fails_fast_on_an_unreachable_server(capsys):
    t0 = time.monotonic()
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert registry.main(["--tracking-uri", uri, "show", f"{NAME}@champion"]) == 3
    assert time.monotonic() - t0 < 10
    assert "unreachable" in capsys.readouterr().err


def test_registry_show_in_a_folder_without_a_database_creates_none(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    for cmd in (["show", f"{NAME}@champion"], ["evaluate", f"models:/{NAME}@champion"]):
        out = subprocess.run([sys.executable, "-m", "pipeline.registry", *cmd], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 3, out.stderr
        assert f"no tracking database at {tmp_path}/mlflow.db" in out.stderr
        assert list(tmp_path.iterdir()) == []


def test_registry_show_prints_the_promotion(store, capsys):
    v = _register(store, _ev(0.5, flags={"zero_gradients": True})).registered.version
    assert registry.main(["--tracking-uri", store["uri"], "show", f"models:/{NAME}/{v}"]) == 0
    out = capsys.readouterr().out
    assert "not promoted: evaluation raised gradient-masking flags: zero_gradients" in out
