"""Tests for rarn.robust (steps, loop, retrain) and rarn.checkpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rarn.checkpoint import CheckpointError, load_checkpoint, load_state_checked, save_checkpoint
from rarn.config import DataConfig, RetrainConfig
from rarn.data import DatasetBundle, TensorImageDataset, load_dataset, make_loader
from rarn.models.darts import build_network
from rarn.robust.loop import TrainingDiverged, evaluate, make_scheduler, train_epoch
from rarn.robust.retrain import run_retrain
from rarn.robust.steps import STEPS, StepOutput, make_step

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared/data/cifar10_subset.npz"


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset(DataConfig(name="digits", limit=160, test_limit=64))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network("RACL", num_classes=10, in_channels=1, C=4, layers=2, auxiliary=True)


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _tiny_cfg(**kw) -> RetrainConfig:
    base = dict(
        genotype="RACL",
        epochs=2,
        batch_size=32,
        init_channels=4,
        layers=2,
        method="fast",
        val_fraction=0.25,
        val_steps=1,
        auxiliary_weight=0.4,
        drop_path=0.2,
        lr=0.05,
    )
    return RetrainConfig(**(base | kw))


# ----------------------------------------------------------------------------------------------
# Steps and the loop


@pytest.mark.parametrize("name", list(STEPS))
def test_every_step_changes_weights_with_finite_loss(name: str) -> None:
    model = _net()
    x, y = _batch()
    kw = {} if name == "standard" else {"generator": torch.Generator().manual_seed(0)}
    if name in ("pgd", "trades"):
        kw["steps"] = 2
    step = make_step(name, auxiliary_weight=0.4, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = train_epoch(model, [(x, y)], step, opt, grad_clip=5.0)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and 0 <= metrics["acc"] <= 1
    assert [p.requires_grad for p in model.parameters()] == flags  # attack froze, then restored
    assert model.training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("cells.0.ops" in k and "weight" in k for k in changed)


def test_bf16_and_channels_last_are_cpu_no_ops() -> None:
    results = []
    for flag in (False, True):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = train_epoch(
            model, [_batch()], make_step("standard"), opt, bf16=flag, channels_last=flag
        )
        results.append((m["loss"], [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_make_step_and_schedule_errors() -> None:
    with pytest.raises(KeyError, match="pgd"):
        make_step("madry")
    with pytest.raises(TypeError, match="beta"):
        make_step("pgd", beta=6.0)
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(KeyError, match="cosine"):
        make_scheduler(opt, "linear", 10)
    sched = make_scheduler(opt, "step", 8)
    for _ in range(6):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_empty_loader_and_divergence() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no batches"):
        train_epoch(model, [], make_step("standard"), opt)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])

    def nan_step(model, x, y):
        out = model(x)[0]
        return StepOutput(out.sum() * float("nan"), out)

    batches = [_batch(), _batch()]
    calls = iter([make_step("standard"), nan_step])

    def second_diverges(model, x, y):
        return next(calls)(model, x, y)

    with pytest.raises(TrainingDiverged, match=r"epoch 3, step 1"):
        train_epoch(model, batches, second_diverges, opt, epoch=3)


def test_evaluate_clean_and_robust() -> None:
    model = _net()
    model.train()
    x, y = _batch(16)
    out = evaluate(model, [(x[:8], y[:8]), (x[8:], y[8:])], attack="pgd", steps=2)
    assert out["samples"] == 16
    assert 0 <= out["robust_acc"] <= out["acc"] <= 1
    assert out["robust_loss"] >= out["loss"] - 1e-6
    assert model.training  # mode restored
    again = evaluate(model, [(x[:8], y[:8]), (x[8:], y[8:])], attack="pgd", steps=2)
    assert again == out  # deterministic default generator
    assert set(evaluate(model, [(x, y)])) == {"loss", "acc", "samples"}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_tamper_and_type_errors(tmp_path: Path) -> None:
    model = _net()
    path = tmp_path / "ck.pt"
    digest = save_checkpoint(path, {"model": model.state_dict(), "epoch": 3}, kind="retrain")
    ck = load_checkpoint(path, kind="retrain", required=("model", "epoch"), expected_sha256=digest)
    other = _net(seed=1)
    load_state_checked(other, ck["model"])
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
    )
    with pytest.raises(CheckpointError, match="expected"):
        load_checkpoint(path, kind="retrain", expected_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="kind"):
        load_checkpoint(path, kind="best_model")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(path, kind="retrain", required=("optimizer",))
    # Tampering: the recorded sha256 no longer matches.
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="modified"):
        load_checkpoint(path, kind="retrain")
    # Not a checkpoint dict / not a torch file / a different format.
    for name, obj in (("list.pt", [1, 2]), ("fmt.pt", {"format": "other", "kind": "retrain"})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="not a"):
            load_checkpoint(tmp_path / name, kind="retrain")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="not a loadable"):
        load_checkpoint(tmp_path / "junk.pt", kind="retrain")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", kind="retrain")
    # Shapes and keys are compared before loading.
    wider = build_network("RACL", num_classes=10, in_channels=1, C=6, layers=2, auxiliary=True)
    with pytest.raises(CheckpointError, match="shape mismatches .*stem.0.weight"):
        load_state_checked(wider, ck["model"])
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_checked(_net(), {k: v for k, v in ck["model"].items() if "aux" not in k})


# ----------------------------------------------------------------------------------------------
# run_retrain


def _comparable(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


class _Crash(RuntimeError):
    pass


def _crash_after_epoch_1_and_resume(cfg, digits, directory):
    """Run ``cfg`` into ``directory`` until a callback crashes it after epoch 1, then resume."""

    def crash_after_first(epoch, metrics):
        if epoch == 1:
            raise _Crash

    with pytest.raises(_Crash):
        run_retrain(cfg, digits, checkpoint_dir=directory, callbacks=[crash_after_first])
    return run_retrain(cfg, digits, checkpoint_dir=directory, device="cpu")


@pytest.mark.parametrize("fold", [False, True])  # the attacks on the model, or its folded copy
def test_resume_is_exact(digits: DatasetBundle, tmp_path: Path, fold: bool) -> None:
    cfg = _tiny_cfg(method="pgd", steps=1, step_size=8 / 255, fold_batchnorm=fold)
    straight = run_retrain(cfg, digits, checkpoint_dir=tmp_path / "a", device="cpu")

    resumed = _crash_after_epoch_1_and_resume(cfg, digits, tmp_path / "b")
    assert _comparable(resumed.history) == _comparable(straight.history)
    assert resumed.selected_by == straight.selected_by
    for k, v in straight.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k
    last_a = load_checkpoint(tmp_path / "a/last.pt", kind="retrain")
    last_b = load_checkpoint(tmp_path / "b/last.pt", kind="retrain")
    for k, v in last_a["model"].items():
        assert torch.equal(v, last_b["model"][k]), k
    # A different config must not silently resume.
    with pytest.raises(CheckpointError, match="different config"):
        run_retrain(dataclasses.replace(cfg, lr=0.01), digits, checkpoint_dir=tmp_path / "b")


def test_best_robust_selection_is_recorded(digits: DatasetBundle, tmp_path: Path) -> None:
    seen: list[tuple[int, dict]] = []

    class Observer:
        def on_epoch_end(self, epoch, metrics):
            seen.append((epoch, dict(metrics)))

    cfg = _tiny_cfg(epochs=3, method="standard")
    res = run_retrain(cfg, digits, checkpoint_dir=tmp_path, callbacks=[Observer()], device="cpu")
    robust = [h["val_robust_acc"] for h in res.history]
    best_epoch = robust.index(max(robust)) + 1
    assert [e for e, _ in seen] == [1, 2, 3]
    assert res.best_epoch == best_epoch and res.best_metric == max(robust)
    assert res.selected_by == f"best_val_robust_acc@epoch {best_epoch}"
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, res.best_state[k]), k
    best = load_checkpoint(tmp_path / "best.pt", kind="best_model")
    assert best["best"]["selected_by"] == res.selected_by
    assert res.final["params"] > 0 and res.final["local_lipschitz"] > 0
    assert math.log(res.final["local_lipschitz"]) <= res.final["log_lipschitz_upper"]
    # Without a validation split the last epoch is kept, and the rule says so.
    last = run_retrain(dataclasses.replace(cfg, epochs=1, val_fraction=0.0), digits, device="cpu")
    assert last.selected_by == "last@epoch 1"


def test_run_retrain_rejects_empty_data_and_bad_config() -> None:
    empty = DatasetBundle(
        TensorImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)),
        TensorImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)),
        10,
        1,
        8,
        "empty",
        "",
    )
    with pytest.raises(ValueError, match="no batches"):
        run_retrain(_tiny_cfg(val_fraction=0.0), empty, device="cpu")
    with pytest.raises(KeyError, match="trades"):
        run_retrain(_tiny_cfg(method="free"), empty, device="cpu")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason="shared CIFAR-10 subset not present")
def test_pgd_at_on_cifar10_subset() -> None:
    """RACL network, PGD-AT on 500 JPEG-degraded CIFAR-10 images, then a PGD-10 evaluation.

    Small on purpose (C=8, 2 cells, 6 epochs, eps = 2/255): ~25 s on an idle 2-core machine.
    The evaluation is on 300 held-out images; chance is 0.10.
    """
    bundle = load_dataset(
        DataConfig(name="cifar10-npz", path=str(SHARED_NPZ), limit=500, test_limit=300)
    )
    cfg = RetrainConfig(
        genotype="RACL",
        epochs=6,
        batch_size=32,
        init_channels=8,
        layers=2,
        lr=0.03,
        weight_decay=5e-4,
        method="pgd",
        eps=2 / 255,
        step_size=2.5 / 255,
        steps=2,
        val_fraction=0.2,
        val_steps=2,
    )
    res = run_retrain(cfg, bundle, device="cpu")
    assert res.selected_by.startswith("best_val_robust_acc@epoch ")
    test = make_loader(bundle.test, 100, shuffle=False)
    out = evaluate(res.model, test, attack="pgd", eps=cfg.eps, step_size=cfg.eps / 4, steps=10)
    assert out["acc"] > 0.2, out
    assert 0.12 < out["robust_acc"] < out["acc"], out


def test_resume_is_exact_with_augmentation(digits: DatasetBundle, tmp_path: Path) -> None:
    """Random crop and flip draw from a checkpointed generator: a resumed run is the same run."""
    cfg = _tiny_cfg(method="pgd", steps=1, step_size=8 / 255, augment="crop_flip")
    straight = run_retrain(cfg, digits, checkpoint_dir=tmp_path / "a", device="cpu")
    plain = run_retrain(dataclasses.replace(cfg, augment="none"), digits, device="cpu")
    assert _comparable(plain.history) != _comparable(straight.history)  # it does augment

    resumed = _crash_after_epoch_1_and_resume(cfg, digits, tmp_path / "b")
    assert _comparable(resumed.history) == _comparable(straight.history)
    for k, v in straight.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k
    last = load_checkpoint(tmp_path / "b/last.pt", kind="retrain")
    assert last["config"]["augment"] == "crop_flip"
    # Turning augmentation on is a different config: no silent resume of a plain run.
    with pytest.raises(CheckpointError, match="different config"):
        run_retrain(dataclasses.replace(cfg, augment="none"), digits, checkpoint_dir=tmp_path / "b")
