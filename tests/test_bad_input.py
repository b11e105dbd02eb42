"""Malformed input, as a new user would try it: every case is rejected at once with a message
naming the key (or file, or field), the bad value and what is allowed (issue 8).

One parametrised test per family: config values, choice fields, YAML files, the tune grid,
``.npz`` files, genotypes, and the pipeline's exit code.
"""

from __future__ import annotations

import io
import re
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from rarn.config import (
    MAX_TRIALS,
    ConfigError,
    DataConfig,
    SearchConfig,
    check,
    load_config,
    parse_value,
)
from rarn.config.schema import Config
from rarn.data import DataError, load_dataset
from rarn.space.genotype import GENOTYPES, Genotype, get_genotype

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _raises(overrides: list[str], *needles: str, path: str | Path = SMOKE) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ----------------------------------------------------------------------------------------------
# Values: the key, the value and the allowed range


@pytest.mark.parametrize(
    "override, needles",
    [
        ("search.epochs=-1", ["search.epochs", "-1", "[1, 10000]"]),
        ("search.epochs=0", ["search.epochs", "[1, 10000]"]),
        ("search.epochs=1e29", ["search.epochs", "expected int", "1e+29"]),
        ("search.epochs=100000000000000000000", ["search.epochs", "[1, 10000]"]),
        ("search.epochs=2.0", ["search.epochs", "expected int"]),
        ("search.epochs=true", ["search.epochs", "expected int"]),
        ("search.epochs=null", ["search.epochs", "expected int"]),
        ("search.batch_size=0", ["search.batch_size", "[1, 65536]"]),
        ("search.batch_size=1000000000", ["search.batch_size", "[1, 65536]"]),
        ("search.warmup_epochs=-1", ["search.warmup_epochs", "[0, 10000]"]),
        ("search.lr=0", ["search.lr", "> 0"]),
        ("search.lr=-0.1", ["search.lr", "> 0"]),
        ("search.lr=.nan", ["search.lr", "finite"]),
        ("search.lr=.inf", ["search.lr", "finite"]),
        ("search.lr=" + "9" * 400, ["search.lr", "finite"]),
        ("search.epochs=" + "9" * 5000, ["search.epochs", "expected int", "..."]),
        ("search.arch_lr=0", ["search.arch_lr", "> 0"]),
        ("search.momentum=1", ["search.momentum", "[0, 1)"]),
        ("search.arch_beta2=1.0", ["search.arch_beta2", "[0, 1)"]),
        ("search.weight_decay=-1e-4", ["search.weight_decay", ">= 0"]),
        ("search.grad_clip=-1", ["search.grad_clip", ">= 0"]),
        ("search.fd_step=0", ["search.fd_step", "> 0"]),
        ("search.grad_norm_weight=-0.1", ["search.grad_norm_weight", ">= 0"]),
        ("search.sigma_init=0", ["search.sigma_init", "> 0"]),
        ("search.sigma_min=3", ["search.sigma_min", "search.sigma_max"]),
        ("search.layers=2", ["search.layers", "[3, 100]"]),
        ("search.init_channels=10", ["search.init_channels", "multiple of 2"]),
        ("search.partial_channels=0", ["search.partial_channels", "[1, 64]"]),
        ("search.decode_samples=0", ["search.decode_samples", "[1, 100000]"]),
        ("search.seed=-1", ["search.seed", "[0, 4294967295]"]),
        ("constraint.eta=1.5", ["constraint.eta", "[0.5, 1)"]),
        ("constraint.eta=1", ["constraint.eta", "[0.5, 1)"]),
        ("constraint.eta=0.2", ["constraint.eta", "[0.5, 1)"]),
        ("constraint.kappa=-1", ["constraint.kappa", "[0, 1]"]),
        ("constraint.rho=0", ["constraint.rho", "> 0"]),
        ("constraint.dual_init=-1", ["constraint.dual_init", ">= 0"]),
        ("constraint.power_iterations=0", ["constraint.power_iterations", "[1, 1000]"]),
        ("constraint.mc_samples=0", ["constraint.mc_samples", "[1, 100000]"]),
        ("retrain.eps=2", ["retrain.eps", "(0, 1]"]),
        ("retrain.eps=0", ["retrain.eps", "(0, 1]"]),
        ("retrain.step_size=-0.01", ["retrain.step_size", "(0, 1]"]),
        ("retrain.steps=0", ["retrain.steps", "[1, 1000]"]),
        ("retrain.epochs=0", ["retrain.epochs", "[1, 10000]"]),
        ("retrain.batch_size=0", ["retrain.batch_size", "[1, 65536]"]),
        ("retrain.val_fraction=1", ["retrain.val_fraction", "[0, 1)"]),
        ("retrain.val_steps=0", ["retrain.val_steps", ">= 1"]),
        ("retrain.drop_path=1", ["retrain.drop_path", "[0, 1)"]),
        ("retrain.lr=0", ["retrain.lr", "> 0"]),
        ("retrain.layers=0", ["retrain.layers", "[1, 100]"]),
        ("evaluation.eps=-0.1", ["evaluation.eps", "(0, 1]"]),
        ("evaluation.batch_size=0", ["evaluation.batch_size", "[1, 65536]"]),
        ("evaluation.steps=0", ["evaluation.steps", "[1, 10000]"]),
        ("evaluation.eps_curve=[0.1, -0.1]", ["evaluation.eps_curve[1]", "(0, 1]"]),
        ("evaluation.eps_curve=0.1", ["evaluation.eps_curve", "expected a list"]),
        ("evaluation.black_box_queries=0", ["evaluation.black_box_queries", "[1, 1000000]"]),
        ("data.test_fraction=1", ["data.test_fraction", "(0, 1)"]),
        ("data.train_portion=0", ["data.train_portion", "(0, 1)"]),
        ("data.limit=-5", ["data.limit", ">= 0"]),
        ("data.image_size=100000", ["data.image_size", "[0, 4096]"]),
        ("tune.num_samples=0", ["tune.num_samples", "[1, 256]"]),
        ("tune.top_k=0", ["tune.top_k", "[1, 256]"]),
        ("tune.max_failures=-1", ["tune.max_failures", "[0, 100]"]),
        ("tune.cpus_per_trial=0", ["tune.cpus_per_trial", "(0, 1024]"]),
        ("tune.retrain_workers=0", ["tune.retrain_workers", "[1, 1024]"]),
        ("tune.select_metric=", ["tune.select_metric"]),
        ("tracking.alias=not an alias", ["tracking.alias", "identifier"]),
        ("tracking.experiment=", ["tracking.experiment"]),
        ("run_dir=", ["run_dir"]),
        ("search.nope=1", ["unknown config key search.nope"]),
        ("search.epochs.deeper=1", ["search.epochs.deeper"]),
        ("search=3", ["search", "expected a mapping"]),
        ("evaluation.attacks=[]", ["evaluation.attacks", "at least one"]),
        ("evaluation.attacks=[pgd, pgd]", ["evaluation.attacks", "twice"]),
        ("evaluation.attacks=pgd", ["evaluation.attacks", "expected a list"]),
        ("retrain.genotype=NOPE", ["retrain.genotype", "RACL", "searched", ".json"]),
        ("retrain.genotype=null", ["retrain.genotype", "expected str"]),
    ],
)
def test_bad_values_name_key_and_allowed_range(override: str, needles: list[str]) -> None:
    _raises([override], *needles)


def test_cross_field_rules() -> None:
    _raises(
        ["constraint.estimator=monte_carlo", "constraint.mc_samples=1"],
        "constraint.mc_samples",
        ">= 2",
    )
    _raises(["tune.scheduler=asha", "tune.grace_period=3"], "tune.grace_period", "search.epochs")
    _raises(["evaluation.autoattack=true", "evaluation.attacks=[pgd, autoattack]"], "autoattack")
    _raises(
        ["tune.param_space={}", "tune.num_samples=2", "search.seed=4294967295"],
        "tune.num_samples",
        "search.seed",
    )
    _raises(
        ["tune.param_space={search.lr: [0.1]}", "tune.num_samples=2", "search.seed=4294967295"],
        "tune.param_space",
        "search.seed: 4294967296 not allowed",
    )


def test_directly_built_sections_are_checked_by_check() -> None:
    check(SearchConfig())
    check(Config())
    with pytest.raises(ConfigError, match=r"search\.epochs: 0 not allowed"):
        check(SearchConfig(epochs=0))
    with pytest.raises(DataError, match=r"data\.train_portion"):
        load_dataset(DataConfig(train_portion=1.5))


# ----------------------------------------------------------------------------------------------
# Choices: every allowed value is listed


def _choice_fields() -> list[tuple[str, tuple[str, ...]]]:
    from rarn.config import build

    out = []
    for section in typing.get_type_hints(Config):
        cls = typing.get_type_hints(Config)[section]
        if not isinstance(cls, type):
            continue
        for name, tp in build._hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                out.append((f"{section}.{name}", typing.get_args(tp)))
    return out


CHOICES = _choice_fields()


def test_choice_fields_are_literals() -> None:
    keys = {k for k, _ in CHOICES}
    expected = {
        "search.grad_norm_mode", "search.decode", "retrain.method", "retrain.schedule",
        "tune.scheduler", "tune.select_mode",
    }  # fmt: skip
    assert expected <= keys


@pytest.mark.parametrize("key, allowed", CHOICES, ids=[k for k, _ in CHOICES])
def test_bad_choice_lists_allowed_values(key: str, allowed: tuple[str, ...]) -> None:
    message = _raises([f"{key}=fenton_wilkinson"], key, "'fenton_wilkinson'", *allowed)
    assert "one of" in message
    _raises([f"{key}=7"], key)


@pytest.mark.parametrize(
    "override, key, registry",
    [
        ("data.name=mnist", "data.name", "rarn.data:DATASETS"),
        (
            "evaluation.attacks=[pgd, nosuch]",
            "evaluation.attacks[1]",
            "rarn.robust.attacks:ATTACKS",
        ),
        ("retrain.genotype=DARTS_V3", "retrain.genotype", "rarn.space.genotype:GENOTYPES"),
        ("constraint.estimator=fw", "constraint.estimator", "rarn.nas.constraint:ESTIMATORS"),
        ("constraint.bound=sum", "constraint.bound", "rarn.nas.constraint:BOUNDS"),
        ("constraint.mixture=some", "constraint.mixture", "rarn.nas.constraint:MIXTURES"),
        ("constraint.threshold=x", "constraint.threshold", "rarn.nas.constraint:THRESHOLDS"),
        ("constraint.balance=x", "constraint.balance", "rarn.nas.balance:BALANCES"),
        ("retrain.genotype=DARTS_V3", "retrain.genotype", "rarn.models.baselines:BASELINES"),
        ("retrain.baselines=[resnet19]", "retrain.baselines[0]", "rarn.space.genotype:GENOTYPES"),
        (
            "retrain.baselines=[RACL, resnet19]",
            "retrain.baselines[1]",
            "rarn.models.baselines:BASELINES",
        ),
    ],
)
def test_registry_choices_list_the_registry(override: str, key: str, registry: str) -> None:
    import importlib

    module, name = registry.split(":")
    names = list(getattr(importlib.import_module(module), name))
    _raises([override], key, *names)


# ----------------------------------------------------------------------------------------------
# YAML files and override text

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- search\n- data\n", "top level must be a mapping"),
        ("just text\n", "top level must be a mapping"),
        ("search:\n  epochs: 2\n  epochs: 3\n", "given twice"),
        (BOMB, "aliases"),
        ("search: {epochs: &e 2}\nretrain: {epochs: *e}\n", "aliases"),
        ("search:\n  epochs: [" + "[" * 40 + "]" * 41 + "\n", "deeper than"),
        ("search: {epochs: !!python/object:os.system x}\n", "not valid YAML"),
        ("search: {epochs: 2\n", "not valid YAML"),
        ("search: {epochs: " + "9" * 5000 + "}\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files_name_the_file(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    t0 = time.monotonic()
    _raises([], str(p), needle, path=p)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    "text, needle",
    [
        ("search: 5\n", "search: expected a mapping"),
        ("search: {1: 2}\n", "unknown config key search.1"),
        ("search: {null: 2}\n", "unknown config key search.None"),
        ("search: {lr: fast}\n", "search.lr: expected float"),
        ("surch: {lr: 0.1}\n", "unknown config key surch"),
    ],
)
def test_bad_yaml_content_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    _raises([], needle, path=p)


def test_unreadable_files(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"run_dir: caf\xe9\n")
    _raises([], str(p), "not valid YAML", path=p)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    _raises([], "1 MiB", path=big)
    _raises([], "not found", path=tmp_path / "missing.yaml")
    _raises([], "not found", path=tmp_path)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("search", "dotted.key=value"),
        ("=3", "empty key"),
        ("tune.param_space={search.seed: &a [0, 1], search.arch_lr: *a}", "aliases"),
        ("search.epochs=" + "9" * 70_000, "at most"),
        ("evaluation.attacks=" + "[" * 50 + "]" * 50, "deeper than"),
    ],
)
def test_bad_override_text(override: str, needle: str) -> None:
    _raises([override], needle)


def test_values_parse_as_yaml_and_1e_minus_3_is_a_float() -> None:
    assert parse_value("1e-3") == 0.001 and parse_value("2") == 2 and parse_value("") == ""
    assert parse_value("[fgsm, pgd]") == ["fgsm", "pgd"] and parse_value("a: b: c") == "a: b: c"
    assert load_config(SMOKE, ["search.lr=1e-3"]).search.lr == 0.001


# ----------------------------------------------------------------------------------------------
# tune.param_space


@pytest.mark.parametrize(
    "space, needle",
    [
        ("{search.nope: [1, 2]}", "search.nope"),
        ("{search.seed: 3}", "tune.param_space.search.seed: expected a non-empty list"),
        ("{search.seed: []}", "tune.param_space.search.seed: expected a non-empty list"),
        ("{search.seed: [1, 1]}", "repeats a value"),
        ("{data.seed: [1, 2]}", "only search and constraint"),
        ("{search.epochs: [2, 0]}", "search.epochs: 0 not allowed"),
        ("{constraint.estimator: [delta, fenton_wilkinson]}", "fenton_wilkinson"),
        ("{search.epochs: [1, 2], search.epochs.x: [1]}", "search.epochs.x"),
    ],
)
def test_bad_param_space(space: str, needle: str) -> None:
    _raises([f"tune.param_space={space}"], needle)


def test_param_space_grid_is_capped_before_expanding() -> None:
    axes = ", ".join(f"search.{k}: [{', '.join(str(i) for i in range(1, 10))}]" for k in
                     ("seed", "epochs", "warmup_epochs", "max_steps_per_epoch", "decode_samples",
                      "batch_size", "nodes", "partial_channels", "init_channels"))  # fmt: skip
    t0 = time.monotonic()
    _raises([f"tune.param_space={{{axes}}}"], "9 x 9 x 9", f"at most {MAX_TRIALS}")
    assert time.monotonic() - t0 < 5
    _raises(["tune.param_space={search.seed: [0, 1, 2, 3]}", "tune.num_samples=65"], "260 trials")


# ----------------------------------------------------------------------------------------------
# .npz files


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good() -> dict[str, np.ndarray]:
    return {"x": np.zeros((40, 6, 6, 3), np.uint8), "y": np.arange(40) % 10}


def _with_member(x_npy: bytes) -> bytes:
    """An archive whose ``x.npy`` member is ``x_npy`` (and a valid ``y``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", x_npy)
        z.writestr("y.npy", _npy(np.arange(4)))
    return buf.getvalue()


def _with_x_header(header: dict) -> bytes:
    member = io.BytesIO()
    npy_format.write_array_header_1_0(member, header)
    return _with_member(member.getvalue() + b"\0" * 64)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _crc_corrupt() -> bytes:
    raw = bytearray(_npz_bytes(**_good()))
    raw[raw.find(b"\x93NUMPY") + 1000] ^= 0xFF  # inside x's data (stored, not compressed)
    return bytes(raw)


NPZ_CASES = {
    "truncated": (lambda: _npz_bytes(**_good())[:3000], "truncated or damaged"),
    "crc": (_crc_corrupt, "corrupt or truncated"),
    "absurd-header": (
        lambda: _with_x_header({"descr": "|u1", "fortran_order": False, "shape": (10**12, 3)}),
        "declares shape",
    ),
    "bad-magic": (
        lambda: _npz_bytes(**_good()).replace(b"\x93NUMPY", b"\x93NUMPX", 1),
        "no valid .npy header",
    ),
    "huge-header": (lambda: _with_member(b"\x93NUMPY\x01\x00\xff\xff" + b" " * 65535), "header"),
    "text": (lambda: b"x,y\n1,2\n3,4\n", "not a zip archive"),
    "npy": (lambda: _npy(np.zeros((4, 6, 6, 3), np.uint8)), "not a zip archive"),
    "empty": (lambda: b"", "not a zip archive"),
    "objects": (
        lambda: _npz_bytes(x=np.array([object()], dtype=object), y=np.zeros(1, np.int64)),
        "pickle",
    ),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz_is_a_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    make, needle = NPZ_CASES[case]
    path = tmp_path / f"{case}.npz"
    path.write_bytes(make())
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="cifar10-npz", path=str(path)))
    message = str(info.value)
    assert str(path) in message and needle in message, message
    assert "allow_pickle" not in message
    assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------------------------
# Genotypes


def _racl(**change: object) -> dict:
    return GENOTYPES["RACL"].to_dict() | change


@pytest.mark.parametrize(
    "d, needle",
    [
        (None, "expected a mapping"),
        ([1, 2], "expected a mapping"),
        ({"normal": []}, "lacks"),
        (_racl(normal=None), "Genotype.normal: expected a list of (op, input) pairs"),
        (_racl(normal="sep_conv_3x3"), "Genotype.normal: expected a list"),
        (_racl(reduce=["sep_conv_3x3 0"] * 8), "Genotype.reduce[0]: expected an (op, input) pair"),
        (_racl(normal=[["sep_conv_3x3", 0, 1]] * 8), "Genotype.normal[0]: expected an (op name"),
        (_racl(normal=[[0, "sep_conv_3x3"]] * 8), "Genotype.normal[0]: expected an (op name"),
        (
            _racl(normal=[["sep_conv_3x3", 1.7]] * 8),
            "Genotype.normal[0] input: expected an integer",
        ),
        (
            _racl(normal=[["sep_conv_3x3", "1"]] * 8),
            "Genotype.normal[0] input: expected an integer",
        ),
        (
            _racl(normal=[["sep_conv_3x3", True]] * 8),
            "Genotype.normal[0] input: expected an integer",
        ),
        (_racl(normal=[["conv_9x9", 0]] * 8), "Genotype.normal[0]: unknown op 'conv_9x9'; known:"),
        (_racl(normal_concat=None), "Genotype.normal_concat: expected a list of node indices"),
        (_racl(normal_concat="2345"), "Genotype.normal_concat: expected a list of node indices"),
        (_racl(normal_concat=[2, 3.5]), "Genotype.normal_concat[1]: expected an integer"),
        (_racl(normal_concat=[2, 9]), "Genotype.normal_concat: indices must lie in 0..5"),
        (_racl(normal_concat=[2, 2]), "Genotype.normal_concat: each node at most once"),
        (_racl(reduce_concat=[]), "Genotype.reduce_concat: indices must lie in"),
    ],
)
def test_bad_genotype_names_the_field(tmp_path: Path, d: object, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        Genotype.from_dict(d)  # type: ignore[arg-type]
    import json

    p = tmp_path / "g.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=re.escape(needle)):
        get_genotype(str(p))


def test_genotype_name_of_the_wrong_type() -> None:
    with pytest.raises(ValueError, match="bundled name"):
        get_genotype(None)  # type: ignore[arg-type]


def test_genotype_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        get_genotype(str(tmp_path / "missing.json"))
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not a valid genotype JSON"):
        get_genotype(str(p))


# ----------------------------------------------------------------------------------------------
# The pipeline: exit 2, nothing written


@pytest.mark.parametrize(
    "override",
    [
        "search.epochs=-1",
        "search.batch_size=0",
        "constraint.eta=1.5",
        "constraint.estimator=fenton_wilkinson",
        "evaluation.eps=-0.1",
        "evaluation.batch_size=0",
        "bad.key=1",
    ],
)
def test_pipeline_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, override) -> None:
    from pipeline.run import main

    monkeypatch.chdir(tmp_path)
    rc = main(["--config", SMOKE, "--quiet", f"run_dir={tmp_path}/run", override])
    assert rc == 2
    assert override.split("=")[0] in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
