"""End-to-end behaviour of the RACL search on tiny digits runs (CPU, seconds)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from rarn.checkpoint import CheckpointError
from rarn.config import ConstraintConfig, DataConfig, SearchConfig, load_config, with_overrides
from rarn.data import load_dataset
from rarn.nas.loop import SearchData, SearchDiverged, run_search
from rarn.nas.search import RACLSearch
from rarn.space.genotype import Genotype

ROOT = Path(__file__).resolve().parents[1]
CIFAR_NPZ = ROOT.parent / "shared/data/cifar10_jpeg.npz"
DATA_CACHE = str(ROOT / "data")  # the decoded JPEG cache (ignored by git), shared by runs

# Tiny but complete: 3 cells (normal, reduction, reduction), 2 nodes per cell, a few steps.
TINY = SearchConfig(
    epochs=2,
    warmup_epochs=1,
    batch_size=16,
    init_channels=8,
    layers=3,
    nodes=2,
    max_steps_per_epoch=2,
    arch_lr=6e-3,
    decode_n=16,
    decode_estimate="first_order",  # the end-of-search selection in 5 passes (exact: ~230)
    robust_eval_n=16,  # val_pgd_acc on 16 D_V images, PGD-2: plumbing (the default 256 images
    robust_eval_steps=2,  # were two thirds of a TINY search; the training never reads it)
    seed=0,
)


@pytest.fixture(scope="module")
def data():
    bundle = load_dataset(DataConfig(name="digits", limit=400))
    return SearchData.from_bundle(bundle, 0.5, 0)


def test_two_epoch_search_yields_valid_genotype(data):
    seen = []
    cfg = dataclasses.replace(TINY, nodes=4)
    result = run_search(cfg, ConstraintConfig(), data, callbacks=[lambda e, m: seen.append((e, m))])
    assert [e for e, _ in seen] == [1, 2]
    assert isinstance(result.genotype, Genotype)
    assert Genotype.from_json(result.genotype.to_json()) == result.genotype
    decoded = {"quantile", "median", "sample", "perturbation"}
    # the P-DARTS cap keeps what it replaced as `<rule>_uncapped`, and only when it acted
    capped = "perturbation_uncapped" in result.genotypes
    assert set(result.genotypes) == decoded | ({"perturbation_uncapped"} if capped else set())
    if capped:
        assert result.reports["perturbation_uncapped"].collapsed
        assert result.genotypes["perturbation_uncapped"] != result.genotype
    assert set(result.reports) == set(result.genotypes)  # every decoding's collapse report
    last = seen[-1][1]
    for key in (
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "mu_F",
        "sigma_F",
        "h",
        "y",
        "p_satisfied",
        "epoch_time",
        "grad_norm",
        "parametric_share",
        "collapse_param_free_share_normal",
        "collapse_param_free_share_reduce",
        "collapse_dominant_op_share",
        "collapse_lambda_ranking",
        "collapsed",
        "arch_stopped",
    ):
        assert key in last and math.isfinite(last[key]), key
    assert last["arch_steps"] == 2 and seen[0][1]["arch_steps"] == 0  # warm-up epoch
    assert len(result.genotype.normal) == 8


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    cfg = TINY
    straight = run_search(cfg, ConstraintConfig(), data, checkpoint_dir=tmp_path / "a")
    run_search(
        dataclasses.replace(cfg, epochs=1), ConstraintConfig(), data, checkpoint_dir=tmp_path / "b"
    )
    resumed = run_search(cfg, ConstraintConfig(), data, checkpoint_dir=tmp_path / "b")
    drop = ("epoch_time",)
    strip = lambda h: [{k: v for k, v in m.items() if k not in drop} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert resumed.genotype == straight.genotype
    assert (tmp_path / "b" / "genotype.json").exists()


def test_steps_touch_only_their_parameters(data):
    s = RACLSearch(TINY, ConstraintConfig(), num_classes=10, in_channels=1)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    snap = lambda ps: [p.detach().clone() for p in ps]  # noqa: E731
    w0, a0 = snap(s.model.weight_parameters()), snap(s.model.arch_parameters())
    s.arch_step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(w0, s.model.weight_parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a0, s.model.arch_parameters()))
    a1 = snap(s.model.arch_parameters())
    s.weight_step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a1, s.model.arch_parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(w0, s.model.weight_parameters()))


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_gradient_norm_modes_agree_roughly(mode):
    cfg = dataclasses.replace(TINY, grad_norm_mode=mode, grad_norm_weight=0.1)
    s = RACLSearch(cfg, ConstraintConfig(), num_classes=10, in_channels=1)
    out = s.weight_step(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    assert math.isfinite(out["train_loss"]) and out["grad_norm"] > 0


def test_finite_difference_penalty_matches_exact_gradient_norm():
    """(l(x + h d) - l(x)) / h -> ||grad_x l|| as h -> 0 (d the unit input gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    model = model.double()
    x.requires_grad_(True)
    per = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    (g,) = torch.autograd.grad(per.sum(), x)
    d = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    per2 = torch.nn.functional.cross_entropy(model(x + 1e-5 * d), y, reduction="none")
    torch.testing.assert_close((per2 - per) / 1e-5, g.flatten(1).norm(dim=1), rtol=1e-3, atol=1e-6)


def test_tight_threshold_lowers_the_bound(data):
    """The constraint works: same seed, a tight lambda_bar ends with a clearly lower mu_F."""
    cfg = dataclasses.replace(TINY, epochs=2, max_steps_per_epoch=6, arch_lr=0.03)
    tight = ConstraintConfig(threshold="tracking", kappa=0.3, rho=1.0)
    off = dataclasses.replace(tight, enabled=False)
    on_run = run_search(cfg, tight, data).final
    off_run = run_search(cfg, off, data).final
    assert on_run["mu_F_last"] < off_run["mu_F_last"] - 0.1, (
        on_run["mu_F_last"],
        off_run["mu_F_last"],
    )
    assert on_run["y"] > 0 and off_run["y"] == 0


def test_divergence_names_epoch_and_step(data):
    cfg = dataclasses.replace(TINY, lr=1e30, grad_clip=0.0, warmup_epochs=2)
    with pytest.raises(SearchDiverged, match=r"epoch 1, step \d+: train_loss"):
        run_search(cfg, ConstraintConfig(), data)


def test_bad_search_config_is_rejected():
    with pytest.raises(ValueError, match="grad_norm_mode"):
        RACLSearch(
            dataclasses.replace(TINY, grad_norm_mode="approx"),
            ConstraintConfig(),
            num_classes=10,
            in_channels=1,
        )
    with pytest.raises(ValueError, match="constraint.mixture"):
        RACLSearch(TINY, ConstraintConfig(mixture="convs"), num_classes=10, in_channels=1)


def test_corrupted_checkpoint_is_a_clear_error(data, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read search checkpoint"):
        run_search(TINY, ConstraintConfig(), data, checkpoint_dir=tmp_path)


def test_lr_follows_the_closed_form_cosine(data, tmp_path):
    """Per epoch, lr = lr_min + (lr - lr_min) (1 + cos(pi e / E)) / 2, also after a resume."""
    cfg = dataclasses.replace(TINY, epochs=4, warmup_epochs=4, max_steps_per_epoch=1, lr_min=0.003)

    def interrupt(epoch, metrics):
        if epoch == 2:
            raise InterruptedError

    with pytest.raises(InterruptedError):
        run_search(cfg, ConstraintConfig(), data, callbacks=[interrupt], checkpoint_dir=tmp_path)
    history = run_search(cfg, ConstraintConfig(), data, checkpoint_dir=tmp_path).history
    closed = [
        cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * e / cfg.epochs))
        for e in range(cfg.epochs)
    ]
    assert [m["lr"] for m in history] == pytest.approx(closed, rel=1e-12, abs=0)


def test_tampered_checkpoint_names_the_file(data, tmp_path):
    """The search checkpoint is a rarn.checkpoint file: its sha256 record catches a flipped byte."""
    run_search(
        dataclasses.replace(TINY, epochs=1), ConstraintConfig(), data, checkpoint_dir=tmp_path
    )
    assert (tmp_path / "checkpoint.pt.sha256").exists()
    raw = bytearray((tmp_path / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"cannot read search checkpoint: .*checkpoint\.pt"):
        run_search(TINY, ConstraintConfig(), data, checkpoint_dir=tmp_path)


def _default_search_on_cifar(seed: int) -> dict:
    """configs/default.yaml's search and constraint on CIFAR-type images (the JPEG copy's first
    1,440 training images at 8 x 8: as many as digits), at ``seed``; one process each."""
    import sys

    sys.path.insert(0, str(ROOT))
    from examples.search_decisions import CIFAR, families

    torch.set_num_threads(1)
    cfg = with_overrides(load_config(ROOT / "configs/default.yaml"),
                         {**CIFAR, "data.root": DATA_CACHE, "search.seed": seed})  # fmt: skip
    bundle = load_dataset(cfg.data)
    d = SearchData.from_bundle(bundle, cfg.data.train_portion, cfg.data.seed)
    res = run_search(cfg.search, cfg.constraint, d)
    arch = [m for m in res.history if m.get("arch_steps", 0) > 0]
    binding = sum(m["frac_dual_positive"] * m["arch_steps"] for m in arch)
    keys = ("penalty_ce_ratio", "mu_move", "confidence_share")
    return {
        "balance": [{k: m[k] for k in keys} for m in arch],
        "genotype": res.genotype.to_dict(),
        "families": families(res.genotype),
        "collapse": res.collapse_reason,
        "arch_steps": sum(m["arch_steps"] for m in arch),
        "binding": binding / max(1.0, sum(m["arch_steps"] for m in arch)),
    }


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason="../shared/data is absent")
def test_default_config_search_does_not_collapse(tmp_path):
    """The default config's search on CIFAR-type images, at two seeds no config names (in two
    processes, one thread each): no op family (sep, dil, pool, skip) holds 12 or more of the 16
    edges, parameter-free ops hold at most 75 %, and the chance constraint binds (dual > 0) on
    at least half of the architecture steps (issue 19). It replaces a digits test that was
    xfail: the median decoding collapsed onto parameter-free ops (6/8 normal edges).

    The same runs check the balance (rarn.nas.balance; test_balance.py before): the constraint
    never pulls much harder than the CE, the means keep moving in every architecture epoch, and
    the chance part counts and shrinks as the ramped margin grows (measured on seed 0 of
    docs/study/decisions_5seeds.json: penalty/CE <= 0.55, mean |d mu| >= 0.024 per epoch,
    chance share 0.61 -> 0.15). Before issue 19 the digits test asserted the opposite: the
    constraint met and its dual 0 in the last epoch, the "never active" regime of spec §10.1."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        2, mp_context=__import__("multiprocessing").get_context("spawn")
    ) as ex:
        results = list(ex.map(_default_search_on_cifar, (11, 12)))
    for r in results:
        fam = r["families"]
        assert max(v for k, v in fam.items() if k != "param_free") < 12, r
        assert fam["param_free"] <= 12, r
        assert r["arch_steps"] > 0 and r["binding"] >= 0.5, r
        bal = r["balance"]
        assert len(bal) >= 2 and max(m["penalty_ce_ratio"] for m in bal) < 3, r
        assert all(m["mu_move"] > 0.005 for m in bal), r
        shares = [m["confidence_share"] for m in bal]
        assert all(0.05 < c < 0.9 for c in shares) and shares[-1] < shares[0], r
