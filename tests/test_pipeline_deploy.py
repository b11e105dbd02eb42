"""Deployment files: the cluster-launcher YAML against Ray's own validation, the KubeRay RayJob's
structure and entry point, and the shipped configs."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.preflight import validate_config
from pipeline.run import STAGES, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT.parents[0] / "shared/data/cifar10_subset.npz"


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


def test_cluster_launcher_config_passes_rays_validation():
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker"):
        assert key in cfg
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs first
    bad = {**copy.deepcopy(cfg), "max_wokers": 3}
    with pytest.raises(jsonschema.ValidationError):  # the validator is real: typos fail
        validate_config(prepare_config(bad))
    gpu = [t for t in cfg["available_node_types"].values() if t.get("max_workers", 0) > 0]
    assert gpu and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])


def test_rayjob_manifest_runs_the_pipeline_entry_point():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipeline/run.py"]
    args = parse_args(argv[2:])
    args.config = str(ROOT / args.config)
    cfg = resolve_config(args)  # the entry point's config and overrides are valid
    validate_config(cfg, list(STAGES), resume=False)
    assert cfg.data.download and cfg.tune.storage_path.startswith("s3://")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    images = {head["image"]} | {
        c["image"] for g in workers for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1  # one project image everywhere
    for group in workers:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    env = {e["name"]: e for e in head["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "MLFLOW_TRACKING_URI" in env
    for name in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name]


@pytest.mark.parametrize("name", ["default", "smoke", "cifar10", "cifar10_subset"])
def test_shipped_configs_are_valid(name):
    args = parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    cfg = resolve_config(args)
    validate_config(cfg, list(STAGES), resume=False)
    if name == "cifar10":  # the paper protocol (spec: 50-epoch search, 20 x 36 PGD-AT)
        assert (cfg.search.epochs, cfg.search.batch_size) == (50, 128)
        assert (cfg.retrain.layers, cfg.retrain.init_channels, cfg.retrain.steps) == (20, 36, 7)
        assert cfg.tune.retrain_use_gpu and cfg.tune.gpus_per_trial > 0


@pytest.mark.skipif(not SUBSET.is_file(), reason="../shared/data/cifar10_subset.npz is absent")
def test_cifar10_subset_config_reads_the_shared_file(monkeypatch):
    from rarn.data import load_dataset

    monkeypatch.chdir(ROOT)  # data.path is relative to the repository root
    cfg = resolve_config(parse_args(["--config", "configs/cifar10_subset.yaml"]))
    bundle = load_dataset(cfg.data)
    assert (len(bundle.train), len(bundle.test)) == (cfg.data.limit, cfg.data.test_limit)
    assert bundle.in_channels == 3 and bundle.image_size == 32
