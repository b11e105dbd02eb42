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


def test_choice_literals_are_what_the_library_supports():
    """The Literal aliases are the one list; the library's tuples must agree with them."""
    from typing import get_args

    from rarn.config import DecodeRule, GradNormMode, Schedule, TrainMethod
    from rarn.nas.decode import DECODERS
    from rarn.robust.loop import SCHEDULES
    from rarn.robust.steps import STEPS

    assert get_args(DecodeRule) == tuple(DECODERS)
    assert get_args(Schedule) == tuple(SCHEDULES)
    assert get_args(TrainMethod) == tuple(STEPS)
    assert get_args(GradNormMode) == ("exact", "finite_difference")


def test_expand_param_space_and_with_overrides():
    from rarn.config import expand_param_space, with_overrides

    cfg = load_config(
        "configs/smoke.yaml",
        ["tune.param_space={search.arch_lr: [0.1, 0.2], constraint.kappa: [0.1]}",
         "tune.num_samples=2", "search.seed=5"],
    )  # fmt: skip
    points = expand_param_space(cfg)
    assert [list(p) for p in points[2:]] == [
        ["constraint.kappa", "search.arch_lr", "search.seed"]
    ] * 2
    assert points == [
        {"constraint.kappa": 0.1, "search.arch_lr": 0.1},
        {"constraint.kappa": 0.1, "search.arch_lr": 0.2},
        {"constraint.kappa": 0.1, "search.arch_lr": 0.1, "search.seed": 6},
        {"constraint.kappa": 0.1, "search.arch_lr": 0.2, "search.seed": 6},
    ]
    trial = with_overrides(cfg, points[3])
    assert (trial.search.seed, trial.search.arch_lr, trial.constraint.kappa) == (6, 0.2, 0.1)
    assert trial.tune == cfg.tune and cfg.search.seed == 5
    with pytest.raises(ConfigError, match="search.epochs: expected int"):
        with_overrides(cfg, {"search.epochs": "x"})
    with pytest.raises(ConfigError, match="unknown config key search.nope"):
        with_overrides(cfg, {"search.nope": 1})
    with pytest.raises(ConfigError, match=r"tune\.param_space: search\.epochs: 0 not allowed"):
        with_overrides(cfg, {"tune.param_space": {"search.epochs": [0, 1]}})


def test_overrides_parse_once_and_dump_round_trips_float_like_strings(tmp_path):
    from rarn.config import apply_overrides, parse_override

    assert parse_override("search.lr=1e-3") == ("search.lr", 0.001)
    assert parse_override("run_dir = runs/x=y") == ("run_dir", "runs/x=y")
    values = {"search": {"epochs": 3}}
    out = apply_overrides(values, ["search.lr=0.5", "tracking.experiment=1e5"])
    assert values == {"search": {"epochs": 3}}  # the input is not modified
    assert out["search"] == {"epochs": 3, "lr": 0.5}
    cfg = load_config(None, ["tracking.experiment='1e5'"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_check_validates_directly_built_sections():
    from rarn.config import ConstraintConfig, SearchConfig, check

    check(Config())
    check(SearchConfig(epochs=2, warmup_epochs=5))  # warm-up longer than the run is allowed
    with pytest.raises(ConfigError, match=r"constraint\.eta: 1\.5 not allowed; must be in"):
        check(ConstraintConfig(eta=1.5))
    with pytest.raises(ConfigError, match="constraint.estimator: 'fw' not allowed"):
        check(ConstraintConfig(estimator="fw"))  # type: ignore[arg-type]


def test_choice_errors_are_config_errors_and_key_errors():
    from rarn.config import ChoiceError, RetrainConfig, check

    with pytest.raises(ChoiceError) as info:
        check(RetrainConfig(method="free"))  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("retrain.method: 'free' not allowed; must be one of: ")
    assert "standard, pgd, trades, fast" in str(info.value)


def test_every_shipped_config_gives_mixed_ops_at_least_four_channels():
    """PC-DARTS passes 1/K of a node's channels through the mixed op: at C = 8 with K = 4 the
    first cells' convolutions saw 2 channels (issue 19). Every shipped config keeps C / K >= 4."""
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        s = load_config(path).search
        assert s.init_channels // s.partial_channels >= 4, (path.name, s.init_channels)
