import subprocess
import sys

import pytest

from rarn.config import Config, ConfigError, config_to_dict, dump_config, load_config


def test_defaults_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("search:\n  epochs: 3\nconstraint:\n  kappa: 1\n")
    cfg = load_config(p)
    assert cfg.search.epochs == 3
    assert cfg.constraint.kappa == 1.0 and isinstance(cfg.constraint.kappa, float)
    assert cfg.data == Config().data


def test_overrides_cast_by_type():
    cfg = load_config(
        None,
        [
            "search.epochs=2",
            "constraint.eta=0.95",
            "search.fused=false",
            "evaluation.attacks=[fgsm, pgd]",
            "data.name=cifar10-npz",
        ],
    )
    assert cfg.search.epochs == 2 and cfg.constraint.eta == 0.95 and cfg.search.fused is False
    assert cfg.evaluation.attacks == ("fgsm", "pgd")
    assert cfg.data.name == "cifar10-npz"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("search.epoch=2", "search.epoch"),
        ("nosuch.x=1", "nosuch"),
        ("search.epochs=two", "search.epochs: expected int"),
        ("search.epochs=2.5", "search.epochs: expected int"),
        ("search.fused=1", "search.fused: expected bool"),
        ("constraint.eta=[1]", "constraint.eta: expected float"),
        ("search.epochs.x=1", "search.epochs.x"),
        ("search", "dotted.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("search:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"search\.lr: expected float"):
        load_config(p)
    p.write_text("serach:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key serach"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_dump_round_trip(tmp_path):
    cfg = load_config("configs/default.yaml", ["search.epochs=1"])
    text = dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert "epochs: 1" in text
    assert config_to_dict(cfg)["evaluation"]["attacks"] == list(cfg.evaluation.attacks)


def test_configs_directory_loads():
    from pathlib import Path

    for p in sorted(Path("configs").glob("*.yaml")):
        load_config(p)


def test_rarn_does_not_import_ray_or_mlflow():
    code = (
        "import rarn, sys, pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(rarn.__path__, 'rarn.'): importlib.import_module(m.name)\n"
        "for name in rarn.__all__: getattr(rarn, name)\n"
        "bad = {'ray', 'mlflow'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
