"""Deployment files: the cluster-launcher YAML against Ray's own validation, the KubeRay RayJob's
structure and entry point, and the shipped configs."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.preflight import validate_config
from pipeline.run import STAGES, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[1]
JPEG = ROOT.parents[0] / "shared/data/cifar10_jpeg.npz"


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
    # Every node's `ray start` carries the tracking server, so drivers and trials on any node
    # log to it (not to an sqlite file in some working directory).
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        started = " ".join(cfg[key])
        uri = started.split("MLFLOW_TRACKING_URI=", 1)[1].split(";")[0].split()[0]
        assert uri.startswith(("http://", "https://")), (key, uri)
    # run_dir lives on a file system mounted at the same path on every node (host and container).
    assert "/mnt/shared" in " ".join(cfg["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]


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
    # Token auth through KubeRay's authOptions: the operator gives RAY_AUTH_MODE and the token
    # (from the Secret, never a literal) to every Ray container *and* the submitter pod; raw env
    # vars on the containers would leave `ray job submit` without the token.
    auth = spec["rayClusterSpec"]["authOptions"]
    assert (
        auth["mode"] == "token" and auth["secretName"] and "token" not in {"auth_token"} & set(auth)
    )
    containers = [head] + [c for g in workers for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env)  # authOptions sets them
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith(("http://", "https://"))
        assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
        assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert any(cfg.run_dir.startswith(m + "/") for m in mounts), (c["name"], mounts)
    assert Path(cfg.run_dir).is_absolute() and cfg.tune.cluster == "multi-node"


@pytest.mark.parametrize("name", ["default", "smoke", "cifar10", "cifar10_subset"])
def test_shipped_configs_are_valid(name):
    args = parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    cfg = resolve_config(args)
    validate_config(cfg, list(STAGES), resume=False)
    if name == "cifar10":  # the paper protocol (spec: 50-epoch search, 20 x 36 PGD-AT)
        assert (cfg.search.epochs, cfg.search.batch_size) == (50, 128)
        assert (cfg.retrain.layers, cfg.retrain.init_channels, cfg.retrain.steps) == (20, 36, 7)
        assert cfg.tune.retrain_use_gpu and cfg.tune.gpus_per_trial > 0


@pytest.mark.skipif(not JPEG.is_file(), reason="../shared/data/cifar10_jpeg.npz is absent")
def test_cifar10_subset_config_reads_the_shared_file(monkeypatch, tmp_path):
    from rarn.data import load_dataset

    monkeypatch.chdir(ROOT)  # data.path is relative to the repository root
    argv = ["--config", "configs/cifar10_subset.yaml", f"data.root={tmp_path}"]
    cfg = resolve_config(parse_args(argv))
    bundle = load_dataset(cfg.data)
    assert (len(bundle.train), len(bundle.test)) == (cfg.data.limit, cfg.data.test_limit)
    assert len(bundle.retrain_set) == cfg.data.retrain_limit
    assert bundle.in_channels == 3 and bundle.image_size == 32


def test_dockerfile_builds_on_rays_image_with_a_cached_dependency_layer():
    """``rayproject/ray:<pinned ray>-py311`` (GPU: a build arg), the dependencies installed from
    pyproject.toml alone before any code is copied, and a non-root user at the end."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    base = next(ln for ln in lines if ln.startswith("ARG BASE=")).split("=", 1)[1]
    assert base == f"rayproject/ray:{ray.__version__}-py311"
    assert next(ln for ln in lines if ln.startswith("FROM")) == "FROM ${BASE}"
    at = {key: next(i for i, ln in enumerate(lines) if key in ln)
          for key in ("pyproject.toml ./", "pip install --no-cache-dir -r", "rarn ./rarn",
                      "pipeline ./pipeline", "--no-deps .")}  # fmt: skip
    assert at["pyproject.toml ./"] < at["pip install --no-cache-dir -r"] < at["rarn ./rarn"]
    assert at["rarn ./rarn"] < at["--no-deps ."] and at["pipeline ./pipeline"] < at["--no-deps ."]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users[-1] not in ("root", "0")
    # The dependency layer's requirement list is exactly pyproject's (same command, run here).
    command = next(ln for ln in lines if "tomllib" in ln).split('python -c "', 1)[1]
    code = command.split('" > /tmp/requirements.txt', 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as in the image
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.returncode == 0 and out.stdout.split("\n")[:-1] == wanted, out.stderr
