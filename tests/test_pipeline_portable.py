"""The portable model (pipeline.portable) for both kinds of network: a DARTS genotype network and a
named network of rarn.models.baselines.BASELINES (here ResNet-18 on 3 x 16 x 16 inputs).

The files round trip (weights and logits equal), every inconsistency is refused before a weight is
read, a ``network.json`` written before named networks existed (no ``kind``) still loads, and a
named network logged to MLflow loads back through the sha256-checked loader and the pyfunc.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.portable import FILES, PortableModelError, load_network, save_network
from rarn.checkpoint import CheckpointError
from rarn.config import load_config
from rarn.models.baselines import BASELINES, baseline_sha256
from rarn.models.darts import build_network
from rarn.space.genotype import get_genotype

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet():
    """A ResNet-18 (3 x 16 x 16, 10 classes) whose BatchNorm statistics moved off their start."""
    torch.manual_seed(0)
    net = BASELINES["resnet18"](num_classes=10, in_channels=3)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        net.train()(x)  # running means and variances are weights too
    return net.eval(), x


def _files(d: Path) -> dict[str, Path]:
    return {k: d / f for k, f in FILES.items()}


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_named_network_round_trip(resnet, tmp_path):
    net, x = resnet
    paths = save_network(net, tmp_path, x[:2], network="resnet18")
    assert set(paths) == {"weights", "network"}  # no genotype.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["network.json", "weights.pt"]
    meta = json.loads(paths["network"].read_text())
    assert meta["kind"] == "baseline" and meta["name"] == "resnet18"
    assert meta["build"] == {"num_classes": 10, "in_channels": 3}
    assert meta["input_shape"] == [3, 16, 16]
    canonical = hashlib.sha256(b'{"network": "resnet18"}').hexdigest()
    assert meta["network_sha256"] == baseline_sha256("resnet18") == canonical
    back = load_network(_files(tmp_path))  # the genotype path is given, and absent: not needed
    assert type(back) is type(net) and not back.training
    _assert_same(net, back, x)


def test_named_network_files_are_checked_before_the_weights(resnet, tmp_path, monkeypatch):
    net, x = resnet
    paths = save_network(net, tmp_path, x[:2], network="resnet18")
    original = json.loads(paths["network"].read_text())
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    cases = [
        ({"name": "resnet19"}, "unknown named network 'resnet19'"),
        ({"name": "mobilenet_v2"}, "network_sha256 is not that of 'mobilenet_v2'"),
        ({"kind": "onnx"}, "unknown kind 'onnx'"),
        ({"weights_sha256": "0" * 64}, "weights.pt has sha256"),
    ]
    for change, message in cases:
        paths["network"].write_text(json.dumps(original | change))
        with pytest.raises(PortableModelError, match=message):
            load_network(paths)
    paths["weights"].unlink()
    with pytest.raises(PortableModelError, match=r"model files missing: \['weights'\]"):
        load_network(paths)
    assert loads == []


def test_a_wrong_name_fails_when_saving(resnet, tmp_path):
    net, x = resnet
    with pytest.raises(CheckpointError, match="registered model weights"):
        save_network(net, tmp_path, x[:2], network="wrn-16-4")
    assert not list(tmp_path.iterdir())  # nothing written


def test_darts_network_json_without_a_kind_still_loads(tmp_path):
    torch.manual_seed(0)
    net = build_network(get_genotype("RACL"), num_classes=10, in_channels=1, C=8, layers=5).eval()
    x = torch.rand(2, 1, 8, 8)
    paths = save_network(net, tmp_path, x)
    assert set(paths) == set(FILES)
    meta = json.loads(paths["network"].read_text())
    assert meta["kind"] == "darts" and meta["genotype_sha256"] == net.genotype.sha256()
    del meta["kind"]  # as written before named networks existed
    paths["network"].write_text(json.dumps(meta, indent=1, sort_keys=True))
    _assert_same(net, load_network(paths), x)
    paths["genotype"].unlink()
    with pytest.raises(PortableModelError, match=r"model files missing: \['genotype'\]"):
        load_network(paths)


def test_named_network_through_mlflow(resnet, tmp_path, monkeypatch):
    import mlflow

    from pipeline.model_store import load_model_checked, log_model_checked
    from pipeline.tracking import prepare_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    net, x = resnet
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(str(ROOT / "configs/smoke.yaml"), [f"run_dir={tmp_path}/run"])
    tracking = prepare_tracking(cfg, uri=uri, run_dir=tmp_path / "run", fingerprint="f" * 64)
    run = tracking.child_run("retrain", "ref-resnet18")
    model_uri, sha = log_model_checked(tracking, run.run_id, net, x[:2], network="resnet18")
    run.end()
    back = load_model_checked(tracking, model_uri, sha)
    _assert_same(net, back, x)
    location = tracking.client().get_logged_model(model_uri.removeprefix("models:/"))
    art = Path(location.artifact_location.removeprefix("file://"))
    assert {p.name for p in (art / "artifacts").iterdir()} == {"weights.pt", "network.json"}
    assert "torchvision==" in (art / "requirements.txt").read_text()
    # this test only (mlflow.set_tracking_uri would leak the URI into later tests' resumes)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    with torch.no_grad():
        expected = net(x).numpy()
    assert np.allclose(pyfunc.predict(x.numpy()), expected, atol=1e-6)
